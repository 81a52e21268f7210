package caddyshaker

import (
	"encoding/json"
	"fmt"
	"net/http"

	"github.com/caddyserver/caddy/v2"
)

// adminAPI is a module that provides the /shaker/upstreams endpoint of
// Caddy's admin API: the health of every address the shaker app probes.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.shaker",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Routes returns a route for the /shaker/upstreams endpoint.
func (a adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{
			Pattern: "/shaker/upstreams",
			Handler: caddy.AdminHandlerFunc(a.handleUpstreams),
		},
	}
}

// handleUpstreams answers GET /shaker/upstreams with a JSON array with
// one object per probed address (see Status), sorted by upstream.
func (adminAPI) handleUpstreams(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{
			HTTPStatus: http.StatusMethodNotAllowed,
			Err:        fmt.Errorf("method not allowed"),
		}
	}
	w.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(w).Encode(currentStatuses()); err != nil {
		return caddy.APIError{
			HTTPStatus: http.StatusInternalServerError,
			Err:        err,
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.AdminRouter = (*adminAPI)(nil)
)
