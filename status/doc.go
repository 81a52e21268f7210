// Package status is the status page of the caddy-shaker plugin: the HTTP
// handler http.handlers.shaker_status (the Caddyfile directive
// `shaker_status`), an HTML page of every probed address's health, or the
// same as JSON.
//
// It reads the statuses through a Source, which the plugin's root package
// sets (SetSource) with its registry; importing the root registers the
// page as well, so that `xcaddy build --with` the plugin brings it. It
// does not import the root.
//
// The files, by concern:
//
//   - page.go: the handler, its settings, Caddyfile and provisioning, and
//     content negotiation;
//   - view.go: one request's view: the summary counts, the filter, the
//     sort and the paging;
//   - render.go: the JSON, and the HTML page from assets/ (template,
//     style, script, and its Content-Security-Policy);
//   - history.go: the RTT history sampler behind the sparklines.
package status
