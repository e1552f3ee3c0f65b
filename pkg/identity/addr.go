package identity

import (
	"context"
	"net/netip"
)

type sourceAddrKey struct{}

// WithSourceAddr returns ctx carrying the address a connection comes from
// (the address of the client the proxy accepted), for the tunnel client to
// send in its header beside the workload identity (WithSource): the
// receiving node matches it against address rules (Istio's ipBlocks) once
// it verified that the sending node may speak for it. It is independent of
// WithSource: a connection may carry either, both or neither.
func WithSourceAddr(ctx context.Context, addr netip.Addr) context.Context {
	return context.WithValue(ctx, sourceAddrKey{}, addr)
}

// SourceAddrFrom is the address WithSourceAddr put in ctx (IPv4-mapped
// IPv6 as IPv4, without a zone); false when ctx carries none, or an
// unspecified one.
func SourceAddrFrom(ctx context.Context) (netip.Addr, bool) {
	a, ok := ctx.Value(sourceAddrKey{}).(netip.Addr)
	a = a.Unmap().WithZone("")
	return a, ok && a.IsValid() && !a.IsUnspecified()
}
