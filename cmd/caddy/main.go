// Command caddy is Caddy with its standard modules and the caddy-shaker
// plugin, as xcaddy would build it:
//
//	xcaddy build --with github.com/caddy-shaker/caddy-shaker
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	// plug in Caddy modules here
	_ "github.com/caddy-shaker/caddy-shaker"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

func main() {
	caddycmd.Main()
}
