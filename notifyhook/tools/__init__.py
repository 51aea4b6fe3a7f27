"""Demo, bench and test harness: tooling around notifyhook that the core never imports."""
