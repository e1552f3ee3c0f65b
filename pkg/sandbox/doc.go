// Package sandbox makes isolated places to run processes — network
// namespaces and processes born into a cgroup — for tests and for
// `smeshd bench`.
//
// It holds the mechanics only: creating, entering and deleting named network
// namespaces, linking two of them with a veth pair, and starting a process
// inside a cgroup and a namespace. Naming, address plans and cleanup policy
// belong to the caller (pkg/testenv ties them to testing.TB). Every function
// leaves the calling goroutine's OS thread where it was.
package sandbox
