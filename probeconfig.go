package caddyshaker

import (
	"fmt"
	"net/netip"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-shaker/caddy-shaker/health"
)

// ProbeConfig is how addresses are probed and judged: the settings that
// every way of using the plugin shares (the `dynamic shaker` upstream
// source, the `shaker` load-balancing policies). Modules embed it, so its
// fields sit flat in their JSON, and call SetDefaults, Validate,
// UnmarshalSubdirective and Want rather than handling a field themselves.
type ProbeConfig struct {
	// The time between the starts of two probes of one address.
	// Default: 2s.
	Interval caddy.Duration `json:"interval,omitempty"`

	// How long a probe waits for a SYN-ACK before it counts as failed
	// ("timeout"). Probes of one address never overlap: with a timeout
	// longer than the interval, the next probe starts when the last one
	// ends. Default: 1s.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// The time between probes of an address that is changing state: one
	// that is up but whose last probes failed, or down but whose last
	// probes were answered. A short one makes detection faster without
	// probing steady addresses more often (HAProxy's fastinter): an
	// address goes down within interval + (fails-1) x fast_interval +
	// timeout. Default: the interval.
	FastInterval caddy.Duration `json:"fast_interval,omitempty"`

	// The time between probes of an address that is down (HAProxy's
	// downinter): longer to probe dead backends less, shorter to bring
	// them back sooner. Default: the interval.
	DownInterval caddy.Duration `json:"down_interval,omitempty"`

	// How much every interval between probes (interval, fast_interval or
	// down_interval, whichever is in use) varies at random, so that many
	// proxies probing the same backends do not fall into step and send
	// their SYNs in bursts (Envoy's interval_jitter, HAProxy's
	// spread-checks): each is drawn uniformly from [interval - j,
	// interval + j], so the mean rate does not change. j is a percentage
	// of the interval in use, from 0 to 50% ("10%"), or a duration
	// ("200ms") of at most half the interval (cut to half of
	// fast_interval or down_interval while a shorter one is in use);
	// "0", "0%" or "off" for none. It lengthens the worst-case detection
	// time by j per failed probe: (interval + j) x fails + timeout.
	// Default: "5%".
	Jitter Jitter `json:"jitter,omitempty"`

	// The consecutive answered probes that bring a down address back up.
	// Default: 2.
	Passes int `json:"passes,omitempty"`

	// The consecutive failed probes (refused, timeout, unreachable, or
	// another error) that take an up address down. Default: 3.
	Fails int `json:"fails,omitempty"`

	// Fail open below this fraction of addresses up (0 to 1, like Envoy's
	// panic threshold): when fewer than panic_threshold x all addresses
	// are up, every address is used, up or down, instead of only those
	// up. 0, the default, never fails open: only addresses that are up
	// are used, and with none up the proxy has no upstream to offer.
	PanicThreshold float64 `json:"panic_threshold,omitempty"`

	// Ramp a returning address's share of requests up over this time, as
	// HAProxy's slowstart and Envoy's slow_start_config: an address that
	// comes back into service (down to up, but not its first result at
	// start; back from maintenance or drain) is left out of a share of
	// the choices that shrinks linearly from all to none over
	// slow_start, so that its share of requests grows from nearly none to
	// its full share. It works with every selection policy; hash-based
	// ones (ip_hash, uri_hash, header, cookie, client_ip_hash) send a key
	// to the address only on the calls that include it, so keys move back
	// to it gradually. Default: 0, off.
	SlowStart caddy.Duration `json:"slow_start,omitempty"`

	// If set, probe this port instead of each upstream's own port
	// (requests still go to the upstream's port). 1-65535.
	Port int `json:"port,omitempty"`

	// How often host names are resolved again. Default: 1m.
	ResolveInterval caddy.Duration `json:"resolve_interval,omitempty"`

	// How long one resolution of a host name may take. On failure the
	// addresses found last are kept. Default: 5s.
	ResolveTimeout caddy.Duration `json:"resolve_timeout,omitempty"`

	jit      jitter          // Jitter parsed, by SetDefaults
	jitterAt caddyfile.Token // where the Caddyfile gave jitter, for its error
}

// SetDefaults fills in the settings left unset, then checks them all; its
// errors name the bad value.
func (pc *ProbeConfig) SetDefaults() error {
	if pc.Interval == 0 {
		pc.Interval = caddy.Duration(DefaultInterval)
	}
	if pc.Timeout == 0 {
		pc.Timeout = caddy.Duration(DefaultTimeout)
	}
	if pc.Passes == 0 {
		pc.Passes = DefaultPasses
	}
	if pc.Fails == 0 {
		pc.Fails = DefaultFails
	}
	if pc.ResolveInterval == 0 {
		pc.ResolveInterval = caddy.Duration(DefaultResolveInterval)
	}
	if pc.ResolveTimeout == 0 {
		pc.ResolveTimeout = caddy.Duration(DefaultResolveTimeout)
	}
	if pc.Jitter == "" {
		pc.Jitter = Jitter(strconv.Itoa(DefaultJitterPercent) + "%")
	}
	if err := pc.Validate(); err != nil {
		return err
	}
	pc.jit, _ = pc.jitterSetting() // Validate checked it
	return nil
}

// Validate checks the settings, set or not (0 is the default); each error
// names the bad value.
func (pc *ProbeConfig) Validate() error {
	// 0 is accepted everywhere below: the default, or none
	// (SetDefaults fills in the defaults after it calls Validate)
	defInterval := "0 for the default, " + DefaultInterval.String()
	for _, iv := range []struct {
		name string
		d    caddy.Duration
		zero string
	}{{"interval", pc.Interval, defInterval}, {"fast_interval", pc.FastInterval, "0 for none"}, {"down_interval", pc.DownInterval, "0 for none"}} {
		if iv.d != 0 && time.Duration(iv.d) < MinInterval {
			return fmt.Errorf("%s %v: must be at least %v (or %s)", iv.name, time.Duration(iv.d), MinInterval, iv.zero)
		}
	}
	if pc.Timeout < 0 {
		return fmt.Errorf("timeout %v: must not be negative (0 for the default, %v)", time.Duration(pc.Timeout), DefaultTimeout)
	}
	if pc.Passes < 0 {
		return fmt.Errorf("passes %d: must not be negative (0 for the default, %d)", pc.Passes, DefaultPasses)
	}
	if pc.Fails < 0 {
		return fmt.Errorf("fails %d: must not be negative (0 for the default, %d)", pc.Fails, DefaultFails)
	}
	if _, err := pc.jitterSetting(); err != nil {
		return err
	}
	if pc.PanicThreshold < 0 || pc.PanicThreshold > 1 {
		return fmt.Errorf("panic_threshold %v: must be a fraction from 0 to 1", pc.PanicThreshold)
	}
	if pc.Port < 0 || pc.Port > 65535 {
		return fmt.Errorf("port %d: out of range 1-65535", pc.Port)
	}
	if pc.ResolveInterval < 0 {
		return fmt.Errorf("resolve_interval %v: must not be negative (0 for the default, %v)", time.Duration(pc.ResolveInterval), DefaultResolveInterval)
	}
	if pc.ResolveTimeout < 0 {
		return fmt.Errorf("resolve_timeout %v: must not be negative (0 for the default, %v)", time.Duration(pc.ResolveTimeout), DefaultResolveTimeout)
	}
	if pc.SlowStart < 0 {
		return fmt.Errorf("slow_start %v: must not be negative (0 for none)", time.Duration(pc.SlowStart))
	}
	return nil
}

// ProbeSubdirectives lists the Caddyfile subdirectives UnmarshalSubdirective
// takes, for the modules' syntax docs.
const ProbeSubdirectives = `interval         <duration>
fast_interval    <duration>
down_interval    <duration>
jitter           <duration|percent>
timeout          <duration>
passes           <n>
fails            <n>
port             <port>
panic_threshold  <fraction|percent>
slow_start       <duration>
resolve_interval <duration>
resolve_timeout  <duration>`

// UnmarshalSubdirective reads the subdirective d is on, if it is one of
// ProbeSubdirectives: it reports false, and reads nothing, for any other.
// Call FinishCaddyfile after the block.
func (pc *ProbeConfig) UnmarshalSubdirective(d *caddyfile.Dispenser) (bool, error) {
	var err error
	switch name := d.Val(); name {
	case "interval":
		pc.Interval, err = ArgDuration(d)
	case "fast_interval":
		pc.FastInterval, err = ArgDuration(d)
	case "down_interval":
		pc.DownInterval, err = ArgDuration(d)
	case "timeout":
		pc.Timeout, err = ArgDuration(d)
	case "resolve_interval":
		pc.ResolveInterval, err = ArgDuration(d)
	case "resolve_timeout":
		pc.ResolveTimeout, err = ArgDuration(d)
	case "slow_start":
		pc.SlowStart, err = ArgDuration(d)
	case "passes", "fails":
		var n int
		n, err = ArgInt(d, 1, maxInt)
		if name == "passes" {
			pc.Passes = n
		} else {
			pc.Fails = n
		}
	case "port":
		pc.Port, err = ArgInt(d, 1, 65535)
	case "panic_threshold":
		pc.PanicThreshold, err = ArgFraction(d)
	case "jitter":
		// checked by FinishCaddyfile, against its interval
		var s string
		if s, err = ArgString(d); err == nil {
			pc.Jitter, pc.jitterAt = Jitter(s), d.Token()
		}
	default:
		return false, nil
	}
	return true, err
}

// FinishCaddyfile checks what only the whole block can tell (a jitter
// against its interval), with the error at the subdirective's line.
func (pc *ProbeConfig) FinishCaddyfile() error {
	if pc.Jitter == "" {
		return nil
	}
	if _, err := pc.jitterSetting(); err != nil {
		at := caddyfile.NewDispenser([]caddyfile.Token{pc.jitterAt})
		at.Next()
		return at.Err(err.Error())
	}
	return nil
}

// Settings are the health layer's settings for these; call SetDefaults
// first.
func (pc *ProbeConfig) Settings() health.Settings {
	return health.Settings{
		Interval:      time.Duration(pc.Interval),
		Timeout:       time.Duration(pc.Timeout),
		Passes:        pc.Passes,
		Fails:         pc.Fails,
		FastInterval:  time.Duration(pc.FastInterval),
		DownInterval:  time.Duration(pc.DownInterval),
		JitterPercent: pc.jit.percent,
		Jitter:        pc.jit.d,
	}
}

// Want is addr to probe under these settings (at port, when set),
// reported under name.
func (pc *ProbeConfig) Want(addr netip.AddrPort, name string) health.Want {
	if pc.Port != 0 {
		addr = netip.AddrPortFrom(addr.Addr(), uint16(pc.Port))
	}
	return health.Want{Addr: addr, Name: name, Settings: pc.Settings()}
}

// ArgString reads a subdirective's one argument.
func ArgString(d *caddyfile.Dispenser) (string, error) {
	if !d.NextArg() {
		return "", d.ArgErr()
	}
	val := d.Val()
	if d.NextArg() {
		return "", d.ArgErr()
	}
	return val, nil
}

// ArgDuration reads a subdirective's one argument, a positive duration;
// its errors name the subdirective and the value.
func ArgDuration(d *caddyfile.Dispenser) (caddy.Duration, error) {
	name := d.Val()
	val, err := ArgString(d)
	if err != nil {
		return 0, err
	}
	dur, err := caddy.ParseDuration(val)
	if err != nil {
		return 0, d.Errf("%s '%s': %v", name, val, err)
	}
	if dur <= 0 {
		return 0, d.Errf("%s '%s': must be positive", name, val)
	}
	return caddy.Duration(dur), nil
}

// ArgInt reads a subdirective's one argument, an integer from lo to hi
// (maxInt: no upper bound).
func ArgInt(d *caddyfile.Dispenser, lo, hi int) (int, error) {
	name := d.Val()
	val, err := ArgString(d)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(val)
	if err != nil {
		return 0, d.Errf("%s '%s': not an integer", name, val)
	}
	if n < lo || n > hi {
		if hi == maxInt {
			return 0, d.Errf("%s '%s': must be at least %d", name, val, lo)
		}
		return 0, d.Errf("%s '%s': out of range %d-%d", name, val, lo, hi)
	}
	return n, nil
}

// ArgFraction reads a subdirective's one argument, a fraction above 0 and
// at most 1 (0.5) or a percentage (50%).
func ArgFraction(d *caddyfile.Dispenser) (float64, error) {
	name := d.Val()
	val, err := ArgString(d)
	if err != nil {
		return 0, err
	}
	num, scale, err := parseFraction(val)
	if err != nil || !(num/scale > 0 && num/scale <= 1) { // NaN too
		return 0, d.Errf("%s '%s': must be a fraction above 0 and at most 1 (0.5) or a percentage (50%%)", name, val)
	}
	return num / scale, nil
}

// jitterSetting reads the jitter: "" is DefaultJitterPercent, and a
// duration is checked against the interval (0 is DefaultInterval, as
// SetDefaults makes it). Its errors name the value.
func (pc *ProbeConfig) jitterSetting() (jitter, error) {
	if pc.Jitter == "" {
		return jitter{percent: DefaultJitterPercent}, nil
	}
	iv := time.Duration(pc.Interval)
	if iv == 0 {
		iv = DefaultInterval
	}
	j, err := parseJitter(string(pc.Jitter), iv)
	if err != nil {
		return jitter{}, fmt.Errorf("jitter %q: %v", string(pc.Jitter), err)
	}
	return j, nil
}
