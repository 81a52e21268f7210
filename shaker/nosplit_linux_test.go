//go:build linux && !shaker_fallback

package shaker

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strings"
	"testing"
)

// TestNoSafePointInWindows: the code between a SYN-ACK and its close
// must give the Go scheduler no safe point (synwindow_linux.go), and the
// closer's code runs inside a system call with no P (closer_linux.go).
// Both hold only while every function they call, all the way down, is
// nosplit: this walks the calls from synWindow and from the closer's
// serve through the package's source and fails on any that is not, or
// that leaves the package other than for a raw system call, sync/atomic
// (but its pointer writes) or unsafe; and on an entry point that may be
// inlined.
func TestNoSafePointInWindows(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	funcs := map[string]*ast.FuncDecl{} // by name; methods by their name alone
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") || strings.HasSuffix(f, "_other.go") {
			continue
		}
		af, err := parser.ParseFile(fset, f, nil, parser.ParseComments)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range af.Decls {
			if fd, ok := d.(*ast.FuncDecl); ok {
				funcs[fd.Name.Name] = fd
			}
		}
	}
	outside := map[string]bool{
		"syscall.RawSyscall": true, "syscall.RawSyscall6": true, "unix.RawSyscall": true, "unix.RawSyscall6": true,
		"unsafe.Pointer": true, "unsafe.Sizeof": true, "syscall.Errno": true,
	}
	// builtins and conversions, and the runtime's functions that
	// the package links to, all nosplit in the runtime
	builtins := map[string]bool{"len": true, "int": true, "int32": true, "int64": true, "uint32": true, "uint64": true, "uintptr": true}
	runtime := map[string]bool{"nanotime": true, "entersyscall": true, "exitsyscall": true}
	seen := map[string]bool{}
	var walk func(name, from string)
	walk = func(name, from string) {
		if seen[name] {
			return
		}
		seen[name] = true
		fd := funcs[name]
		if fd == nil {
			t.Errorf("%s calls %s, which is not in the package", from, name)
			return
		}
		if fd.Body == nil {
			if !runtime[name] || !strings.Contains(directives(fd.Doc), "go:linkname "+name+" runtime."+name) {
				t.Errorf("%s (called from %s) has no body and is not one of the runtime's nosplit functions", name, from)
			}
			return
		}
		if !strings.Contains(directives(fd.Doc), "//go:nosplit\n") {
			t.Errorf("%s (called from %s) is not nosplit", name, from)
		}
		ast.Inspect(fd.Body, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			switch fn := call.Fun.(type) {
			case *ast.Ident:
				if !builtins[fn.Name] {
					walk(fn.Name, name)
				}
			case *ast.SelectorExpr:
				if pkg, ok := fn.X.(*ast.Ident); ok && (pkg.Name == "syscall" || pkg.Name == "unix" || pkg.Name == "atomic" || pkg.Name == "unsafe") {
					// sync/atomic's pointer writes have write barriers,
					// which the closer, with no P, must not run
					q := pkg.Name + "." + fn.Sel.Name
					if pkg.Name == "atomic" && !strings.Contains(fn.Sel.Name, "Pointer") || pkg.Name == "atomic" && fn.Sel.Name == "LoadPointer" {
						return true
					}
					if !outside[q] {
						t.Errorf("%s calls %s", name, q)
					}
					return true
				}
				walk(fn.Sel.Name, name) // a method
			case *ast.ParenExpr, *ast.ArrayType, *ast.StarExpr:
				// a conversion
			default:
				t.Errorf("%s makes a call the test cannot follow: %T", name, fn)
			}
			return true
		})
	}
	for _, entry := range []string{"synWindow", "serve"} {
		// inlined into a caller that is not nosplit, an entry point
		// would have safe points again
		if fd := funcs[entry]; fd == nil || !strings.Contains(directives(fd.Doc), "//go:noinline\n") {
			t.Errorf("%s is not go:noinline", entry)
		}
	}
	walk("synWindow", "the SYN's window")
	walk("serve", "the closer")
	for _, want := range []string{"rawConnect", "readTCPInfo", "watch", "nanotime", "closeAnswered"} {
		if !seen[want] {
			t.Errorf("the walk never reached %s: it does not follow the calls", want)
		}
	}
}

// directives is a doc comment's lines as written, directives included
// (CommentGroup.Text leaves them out).
func directives(g *ast.CommentGroup) string {
	var b strings.Builder
	if g == nil {
		return ""
	}
	for _, c := range g.List {
		b.WriteString(c.Text)
		b.WriteByte('\n')
	}
	return b.String()
}
