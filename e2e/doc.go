// Package e2e holds smesh's end-to-end kernel tests: a real smeshd (the
// daemon, in a process of its own) captures and splices the connections of
// real processes in test cgroups and network namespaces, and the tests check
// every byte that crosses.
package e2e
