// Package deploy holds the files a node operator installs alongside the
// smeshd binary: the systemd units smeshd.service and smesh.slice, and the
// drop-in smeshd.service.d/notify-reload.conf for systemd 253 and later.
// Its tests check them with the tools that will read them, systemd itself
// included: systemd_test.go installs smeshd as the README says in
// containers booted with systemd as PID 1. There is no Go API.
package deploy
