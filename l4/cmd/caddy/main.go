// Command caddy is Caddy with its standard modules, caddy-l4 and both
// parts of the caddy-shaker plugin, as xcaddy would build it:
//
//	xcaddy build --with github.com/caddy-shaker/caddy-shaker \
//	    --with github.com/caddy-shaker/caddy-shaker/l4 \
//	    --with github.com/mholt/caddy-l4@v0.1.2
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	// plug in Caddy modules here
	_ "github.com/caddy-shaker/caddy-shaker"
	_ "github.com/caddy-shaker/caddy-shaker/l4"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-l4"
)

func main() {
	caddycmd.Main()
}
