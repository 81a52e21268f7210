package caddyshaker

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// The one parser of upstream addresses: configured upstreams, the dials
// that an inner source returns, and `caddy shake`'s arguments all go
// through parseUpstream.

// upstreamSpec is a configured upstream, parsed.
type upstreamSpec struct {
	raw  string
	host string     // host name, or "" when ip is set
	ip   netip.Addr // valid for an IP literal
	port uint16
}

// parseUpstreams parses host:port upstreams; errors name the bad value.
func parseUpstreams(ups []string) ([]upstreamSpec, error) {
	specs := make([]upstreamSpec, 0, len(ups))
	for _, raw := range ups {
		s, err := parseUpstream(raw)
		if err != nil {
			return nil, err
		}
		specs = append(specs, s)
	}
	return specs, nil
}

func parseUpstream(raw string) (upstreamSpec, error) {
	bad := func(why string) (upstreamSpec, error) {
		return upstreamSpec{}, fmt.Errorf("upstream %q: %s", raw, why)
	}
	if strings.Contains(raw, "://") {
		return bad("give host:port, without a scheme")
	}
	if strings.ContainsAny(raw, "{}") {
		return bad("placeholders are not supported")
	}
	host, portStr, err := net.SplitHostPort(raw)
	if err != nil {
		var ae *net.AddrError
		if errors.As(err, &ae) {
			if ae.Err == "missing port in address" {
				return bad("missing port")
			}
			return bad("not host:port: " + ae.Err)
		}
		return bad("not host:port: " + err.Error())
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 1 || port > 65535 {
		return bad(fmt.Sprintf("port %q out of range 1-65535", portStr))
	}
	s := upstreamSpec{raw: raw, port: uint16(port)}
	// A fully qualified name may end in a dot; "0.0.0.0." is then the
	// IP address it spells, not a name to resolve.
	if ip, err := netip.ParseAddr(strings.TrimSuffix(host, ".")); err == nil {
		if strings.Contains(ip.Zone(), "/") {
			// No interface name has one, and in a dial address
			// (parseDial, Caddy's own) what stands before a '/' is
			// the network.
			return bad(fmt.Sprintf("IPv6 zone %q: an interface name holds no '/'", ip.Zone()))
		}
		s.ip = ip.Unmap()
		return s, nil
	}
	if !validHostName(host) {
		return bad(fmt.Sprintf("host %q is neither an IP address nor a host name", host))
	}
	s.host = strings.ToLower(strings.TrimSuffix(host, "."))
	return s, nil
}

// validHostName reports whether h is a DNS name (letters, digits, '-',
// '_', dots between labels of 1-63 characters).
func validHostName(h string) bool {
	h = strings.TrimSuffix(h, ".")
	if h == "" || len(h) > 253 {
		return false
	}
	for label := range strings.SplitSeq(h, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, r := range label {
			ok := r == '-' || r == '_' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z'
			if !ok {
				return false
			}
		}
	}
	return true
}

// parseDial parses the Dial of an upstream another source returned: an
// optional tcp/ network, then host:port as parseUpstream takes it. What
// cannot be probed (another network, a placeholder, anything else
// parseUpstream rejects) comes back with probe false.
func parseDial(dial string) *discovered {
	d := &discovered{dial: dial}
	addr := dial
	if network, rest, ok := strings.Cut(dial, "/"); ok {
		switch network {
		case "tcp", "tcp4", "tcp6":
			addr = rest
		default:
			return d // unix, udp, ...: not probed
		}
	}
	s, err := parseUpstream(addr)
	if err != nil {
		return d // a placeholder, known only per request, or not host:port
	}
	d.host, d.ip, d.port, d.probe = s.host, s.ip, s.port, true
	return d
}
