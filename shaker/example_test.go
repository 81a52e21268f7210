package shaker_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/caddy-shaker/caddy-shaker/shaker"
)

// Probe a port without the application behind it ever seeing a connection.
func Example() {
	ln, err := net.Listen("tcp", "127.0.0.1:0") // a backend
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	backend := ln.Addr().(*net.TCPAddr).AddrPort()

	e, err := shaker.New(shaker.Options{})
	if err != nil {
		panic(err)
	}
	defer e.Close()

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	r := e.Probe(ctx, backend)
	fmt.Println("backend up:", r.Err == nil, "rtt measured:", r.RTT > 0)

	ln.Close() // nothing listens now
	r = e.Probe(context.Background(), backend)
	fmt.Println("after close:", errors.Is(r.Err, shaker.ErrRefused))

	// ProbeAsync returns at once; done runs on the engine's loop.
	done := make(chan shaker.Result, 1)
	e.ProbeAsync(netip.MustParseAddrPort("[::1]:1"), 500*time.Millisecond, func(r shaker.Result) { done <- r })
	fmt.Println("::1 port 1 up:", (<-done).Up())
	// Output:
	// backend up: true rtt measured: true
	// after close: true
	// ::1 port 1 up: false
}
