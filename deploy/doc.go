// Package deploy holds the files a node operator installs alongside the
// smeshd binary, such as the systemd unit smeshd.service. Its tests check
// them with the tools that will read them; there is no Go API.
package deploy
