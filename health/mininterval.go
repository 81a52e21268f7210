package health

import "time"

// MinInterval is the shortest interval, fast_interval or down_interval
// the Caddy glue accepts: below it an address would be probed back to
// back. Jitter never takes an interval below it (nor below the interval
// itself, when that is shorter: Settings allow any positive one).
const MinInterval = time.Millisecond
