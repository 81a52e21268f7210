// Package health is the middle layer of caddy-shaker: the health state of
// every probed address and its probe schedule on the engine. It knows
// nothing of Caddy. The Caddy glue above it (the caddyshaker package)
// asks for addresses to be probed, reads their health on every request,
// and is told of every probe and every change of state through an
// Observer; the engine below it (package shaker) runs the probes.
//
// One address probed with one set of Settings is one Checker, however
// many upstream sources and configs use it: a Registry hands out
// references, and a checker stops when its last one is released. Its
// state therefore survives config reloads.
package health
