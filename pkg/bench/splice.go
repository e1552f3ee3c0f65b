package bench

import "github.com/smesh-dev/smesh/pkg/datapath"

// spliceCount is what a smeshd's sk_msg program counted: bytes spliced and
// bytes that demoted directions sent by TCP.
type spliceCount struct{ spliced, demoted uint64 }

// readSpliceCount reads the counters from the maps smeshd (pid) holds: the
// bench asks smeshd nothing.
func readSpliceCount(pid int) (spliceCount, error) {
	st, err := datapath.StatsOf(pid)
	if err != nil {
		return spliceCount{}, err
	}
	return spliceCount{
		spliced: st.ClientToServer.Bytes + st.ServerToClient.Bytes,
		demoted: st.DemotedClientToServer + st.DemotedServerToClient,
	}, nil
}
