//go:build !linux

package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "bench: needs Linux (TCP_QUICKACK, getrusage, epoll)")
	os.Exit(2)
}
