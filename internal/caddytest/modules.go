package caddytest

import (
	"encoding/json"
	"reflect"
	"sync/atomic"
	"testing"
	"unsafe"

	"github.com/caddyserver/caddy/v2"
)

// LoadInline is a fresh, provisioned module of namespace, an M, from js:
// a module object whose inlineKey field names it, as Caddy loads a field
// tagged `caddy:"namespace=... inline_key=..."` (a selection policy's
// {"policy":"round_robin"}). Its context is canceled, the module cleaned
// up, when the test ends. Anything that does not load fails the test.
func LoadInline[M any](tb testing.TB, namespace, inlineKey, js string) M {
	tb.Helper()
	var fields map[string]json.RawMessage
	if err := json.Unmarshal([]byte(js), &fields); err != nil {
		tb.Fatalf("%s: %v", js, err)
	}
	var name string
	if err := json.Unmarshal(fields[inlineKey], &name); err != nil || name == "" {
		tb.Fatalf("%s: no module name in %q (%v)", js, inlineKey, err)
	}
	delete(fields, inlineKey)
	raw, err := json.Marshal(fields)
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: tb.Context()})
	tb.Cleanup(cancel)
	mod, err := ctx.LoadModuleByID(namespace+"."+name, raw)
	if err != nil {
		tb.Fatalf("%s: %v", js, err)
	}
	m, ok := mod.(M)
	if !ok {
		tb.Fatalf("%s: module %T is not a %T", js, mod, &m)
	}
	return m
}

// StoreInt32 stores v in the atomic.Int32 field of the struct s (an
// addressable reflect.Value, as reflect.ValueOf(ptr).Elem() is), exported
// or not: how a test marks an upstream unhealthy as the proxy's own
// health checker would, whose setter is unexported. what names the struct
// for the error when it has no such field (another version of the
// module).
func StoreInt32(tb testing.TB, s reflect.Value, field string, v int32, what string) {
	tb.Helper()
	f := s.FieldByName(field)
	if !f.IsValid() || f.Type() != reflect.TypeFor[atomic.Int32]() || !f.CanAddr() {
		tb.Fatalf("%s has no %s atomic.Int32 in this version", what, field)
	}
	(*atomic.Int32)(unsafe.Pointer(f.UnsafeAddr())).Store(v)
}
