package identity

import "errors"

// ErrUnverifiable is what a verifier of asserted sources (tunnel.
// SourceVerifier) answers for a source it has no way to check: the
// connection is then taken as its node's (no workload, the node's address),
// neither trusted nor refused. Here, not in the tunnel, so that verifiers
// in other packages (pkg/kube) can answer it.
var ErrUnverifiable = errors.New("the source cannot be verified")
