// Package xcaddytest holds one slow test, TestXcaddyBuild: it builds Caddy
// with xcaddy the way README.md tells users to, from this checkout served
// by a module proxy on disk, and checks what the binary holds. It runs only
// with SHAKER_XCADDY=1 (about two minutes per build); .ci/run sets it.
package xcaddytest
