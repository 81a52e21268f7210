package shaker

import (
	"strings"
	"testing"
)

// TestParsePriority: the three names parse, and back; "" is auto;
// anything else is an error that quotes it; New refuses an unknown value.
func TestParsePriority(t *testing.T) {
	for in, want := range map[string]Priority{"": PriorityAuto, "auto": PriorityAuto, "realtime": PriorityRealtime, "normal": PriorityNormal} {
		if p, err := ParsePriority(in); err != nil || p != want || (in != "" && p.String() != in) {
			t.Errorf("ParsePriority(%q) = %v (%q), %v; want %v", in, p, p.String(), err, want)
		}
	}
	for _, bad := range []string{"RealTime", "fifo", " normal", "1"} {
		if _, err := ParsePriority(bad); err == nil || !strings.Contains(err.Error(), `"`+bad+`"`) {
			t.Errorf("ParsePriority(%q): %v, want an error quoting it", bad, err)
		}
	}
	if e, err := New(Options{CloserPriority: 7}); err == nil || !strings.Contains(err.Error(), "CloserPriority Priority(7)") {
		if e != nil {
			e.Close()
		}
		t.Errorf("New with CloserPriority 7: %v, want an error naming it", err)
	}
}
