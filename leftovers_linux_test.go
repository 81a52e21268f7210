//go:build linux

package caddyshaker

import (
	"bytes"
	"fmt"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
)

// fdTargets is this process's open file descriptors, each with what
// /proc/self/fd says it is ("socket:[1234]", "anon_inode:[eventpoll]", a
// path).
func fdTargets() (map[int]string, error) {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil, err
	}
	m := make(map[int]string, len(ents))
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		target, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil {
			continue // the fd of the directory listing itself, closed by now
		}
		m[fd] = target
	}
	return m, nil
}

// goroutineStacks is every goroutine's stack, by goroutine id.
func goroutineStacks() map[int]string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	m := make(map[int]string)
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		var id int
		if _, err := fmt.Sscanf(string(g), "goroutine %d ", &id); err == nil {
			m[id] = string(g)
		}
	}
	return m
}

// newFDs is the fds of after that before did not have: a new number, or
// a number reused for something else.
func newFDs(before, after map[int]string) map[int]string {
	m := make(map[int]string)
	for fd, target := range after {
		if t, ok := before[fd]; !ok || t != target {
			m[fd] = target
		}
	}
	return m
}

// newGoroutines is the goroutines of after that before did not have (ids
// are never reused; a goroutine's stack changes as it runs).
func newGoroutines(before, after map[int]string) map[int]string {
	m := make(map[int]string)
	for id, stack := range after {
		if _, ok := before[id]; !ok {
			m[id] = stack
		}
	}
	return m
}

// describe lists fds or goroutines, one per entry, sorted.
func describe[K comparable](m map[K]string) string {
	var lines []string
	for k, v := range m {
		lines = append(lines, fmt.Sprintf("%v: %s", k, v))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// tcpSocket describes the TCP socket with the given inode from
// /proc/net/tcp and tcp6: its local port and state ("0A" is LISTEN). ok is
// false when no TCP socket has that inode.
func tcpSocket(inode string) (port int, state string, ok bool) {
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fields := strings.Fields(line)
			if len(fields) < 10 || fields[9] != inode {
				continue
			}
			_, hexPort, _ := strings.Cut(fields[1], ":")
			p, err := strconv.ParseInt(hexPort, 16, 32)
			if err != nil {
				continue
			}
			return int(p), fields[3], true
		}
	}
	return 0, "", false
}

// isListener reports whether an fd's target (from fdTargets) is a TCP
// socket listening on port.
func isListener(target string, port int) bool {
	inode, ok := strings.CutPrefix(target, "socket:[")
	if !ok {
		return false
	}
	p, state, ok := tcpSocket(strings.TrimSuffix(inode, "]"))
	return ok && p == port && state == "0A"
}

// goroutineID is the calling goroutine's id, from its stack's first line.
func goroutineID() int {
	buf := make([]byte, 64)
	buf = buf[:runtime.Stack(buf, false)]
	var id int
	fmt.Sscanf(string(buf), "goroutine %d ", &id)
	return id
}
