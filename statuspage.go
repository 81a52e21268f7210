package caddyshaker

import "github.com/caddy-shaker/caddy-shaker/status"

// The status page (http.handlers.shaker_status, the `shaker_status`
// directive) is package status. Importing it registers it, so that
// `xcaddy build --with` this module brings it; it reads the statuses of
// the registry, the admin API's.
func init() { status.SetSource(reg) }
