// Package xcaddytest holds one slow test, TestXcaddyBuild: it builds Caddy
// with xcaddy the way README.md tells users to, from this checkout served
// by a module proxy on disk, and checks what the binary holds. It runs only
// with SHAKER_XCADDY=1 (up to three minutes a build with a cold build
// cache, some twenty seconds with a warm one); .ci/run sets it.
package xcaddytest
