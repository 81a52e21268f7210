package shaker

import (
	"strconv"
	"strings"
	"testing"
)

// TestParseMode: every name String gives parses back to its mode, "" is
// connect, and anything else is an error that quotes it.
func TestParseMode(t *testing.T) {
	for _, c := range []struct {
		in   string
		want Mode
	}{{"", ModeConnect}, {"connect", ModeConnect}, {"raw", ModeRaw}, {"auto", ModeAuto}} {
		m, err := ParseMode(c.in)
		if err != nil || m != c.want {
			t.Errorf("ParseMode(%q) = %v, %v; want %v", c.in, m, err, c.want)
		}
	}
	for _, m := range []Mode{ModeConnect, ModeRaw, ModeAuto} {
		if got, err := ParseMode(m.String()); err != nil || got != m {
			t.Errorf("ParseMode(%q) = %v, %v; want %v back", m.String(), got, err, m)
		}
	}
	for _, bad := range []string{"RAW", " raw", "raw ", "connect,raw", "half-open", "1"} {
		if m, err := ParseMode(bad); err == nil || !strings.Contains(err.Error(), `"`+bad+`"`) {
			t.Errorf("ParseMode(%q) = %v, %v; want an error quoting %q", bad, m, err, bad)
		}
	}
	if s := Mode(9).String(); s != "Mode(9)" {
		t.Errorf("Mode(9).String() = %q", s)
	}
}

// TestParsePortRange: "first-last" and one port parse; a range with port
// 0, upside down, beyond 65535, larger than MaxSourcePorts or not numbers
// is an error that names what was given.
func TestParsePortRange(t *testing.T) {
	for _, c := range []struct {
		in   string
		want PortRange
	}{
		{"61000-61511", PortRange{61000, 61511}},
		{"8080", PortRange{8080, 8080}},
		{" 1024 - 1025 ", PortRange{1024, 1025}},
		{"1-16384", PortRange{1, MaxSourcePorts}},
		{"65535-65535", PortRange{65535, 65535}},
	} {
		r, err := ParsePortRange(c.in)
		if err != nil || r != c.want {
			t.Errorf("ParsePortRange(%q) = %v, %v; want %v", c.in, r, err, c.want)
		}
		if back, err := ParsePortRange(r.String()); err != nil || back != r {
			t.Errorf("ParsePortRange(%q) = %v, %v; want %v back", r.String(), back, err, r)
		}
	}
	if n := (PortRange{61000, 61511}).Size(); n != 512 {
		t.Errorf("Size of 61000-61511 = %d, want 512", n)
	}
	if n := (PortRange{}).Size(); n != 0 {
		t.Errorf("Size of the zero range = %d, want 0", n)
	}
	for _, c := range []struct{ in, says string }{
		{"", `""`},
		{"-", `"-"`},
		{"a-b", `"a-b"`},
		{"1-2-3", `"1-2-3"`},
		{"61000-", `"61000-"`},
		{"1-65536", `"1-65536"`},
		{"-5", `"-5"`},
		{"0-10", "0-10: port 0"},
		{"0", "0-0: port 0"},
		{"10-5", "10-5: the last port is below the first"},
		{"1-16385", "1-16385: 16385 ports, more than 16384"},
	} {
		r, err := ParsePortRange(c.in)
		if err == nil || !strings.Contains(err.Error(), c.says) {
			t.Errorf("ParsePortRange(%q) = %v, %v; want an error saying %q", c.in, r, err, c.says)
		}
	}
}

// TestDefaultRangeAround: the default source ports lie just above the
// ephemeral range when DefaultSourcePorts fit there, else just below it
// (never below 1024), else there is none, and the error says which range
// left no room.
func TestDefaultRangeAround(t *testing.T) {
	for _, c := range []struct {
		lo, hi int
		want   PortRange
	}{
		{32768, 60999, PortRange{61000, 61511}},                                            // Linux's default
		{32768, 65535 - DefaultSourcePorts, PortRange{65024, 65535}},                       // just room above
		{1024 + DefaultSourcePorts, 65535 - DefaultSourcePorts + 1, PortRange{1024, 1535}}, // just room below
		{49152, 65535, PortRange{48640, 49151}},                                            // the IANA range: none above
		{1024, 1024, PortRange{1025, 1536}},
	} {
		r, err := defaultRangeAround(c.lo, c.hi)
		if err != nil || r != c.want {
			t.Errorf("defaultRangeAround(%d, %d) = %v, %v; want %v", c.lo, c.hi, r, err, c.want)
			continue
		}
		if r.Size() != DefaultSourcePorts || int(r.Last) >= c.lo && int(r.First) <= c.hi || r.First < 1024 {
			t.Errorf("defaultRangeAround(%d, %d) = %v: want %d ports above 1023, outside %d-%d", c.lo, c.hi, r, DefaultSourcePorts, c.lo, c.hi)
		}
	}
	for _, c := range [][2]int{
		{1024 + DefaultSourcePorts - 1, 65535 - DefaultSourcePorts + 1}, // one port short on both sides
		{1024, 65535},
		{1, 65535},
	} {
		r, err := defaultRangeAround(c[0], c[1])
		if err == nil {
			t.Errorf("defaultRangeAround(%d, %d) = %v, want an error", c[0], c[1], r)
			continue
		}
		if want := strconv.Itoa(c[0]) + "-" + strconv.Itoa(c[1]); !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "name the source ports") {
			t.Errorf("defaultRangeAround(%d, %d): %v; want an error naming %s and saying to name the source ports", c[0], c[1], err, want)
		}
	}
}

// TestModeOptions: New rejects an unknown mode and a bad source port
// range, naming them, in either engine.
func TestModeOptions(t *testing.T) {
	for _, c := range []struct {
		opts Options
		says string
	}{
		{Options{Mode: 7}, "Mode(7)"},
		{Options{Mode: ModeRaw, SourcePorts: PortRange{100, 99}}, "100-99"},
		{Options{Mode: ModeAuto, SourcePorts: PortRange{0, 10}}, "0-10"},
		{Options{SourcePorts: PortRange{1, 20000}}, "1-20000"},
	} {
		e, err := New(c.opts)
		if err == nil {
			e.Close()
			t.Errorf("New(%+v) accepted it", c.opts)
			continue
		}
		if !strings.Contains(err.Error(), c.says) {
			t.Errorf("New(%+v): %v; want an error naming %s", c.opts, err, c.says)
		}
	}
}
