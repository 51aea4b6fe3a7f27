"""`notifyhook dashboard`: a read-only web page of the queue and every endpoint's health."""
