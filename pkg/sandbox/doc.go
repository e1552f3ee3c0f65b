// Package sandbox makes isolated places to run processes — network
// namespaces and processes born into a cgroup — for tests and for
// `smeshd bench`.
//
// It holds the mechanics only: creating, entering and deleting named network
// namespaces and setting their sysctls, linking two of them with a veth pair,
// building nodes and pods the way the CNI bridge plugin does (ClusterNode,
// Pod, JoinNodes), and starting a process inside a cgroup and a namespace.
// Names, subnets and cleanup policy belong to the caller (pkg/testenv ties
// them to testing.TB); within a pod subnet, a ClusterNode hands out the
// addresses itself, as CNI's host-local plugin does. Every function leaves the
// calling goroutine's OS thread where it was.
package sandbox
