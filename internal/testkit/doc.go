// Package testkit is the one set of helpers that the tests of every package,
// and the bench command, share: network namespaces (netns.go).
//
// The helpers are Linux-only; on other systems the package is empty.
package testkit
