package main

import (
	"fmt"
	"io"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// result is what one size measured.
type result struct {
	size
	nodes, pods, ownPods, namespaces int
	made                             int
	fill                             time.Duration
	truncated                        bool

	ready, listed time.Duration
	readyRSS      int64
	readyHeap     int64
	readyFile     int64
	readyBytes    int64
	peakRSS       int64
	totalBytes    int64
	requests      map[string]int

	idle, other, own phase
}

// phase is one CPU measurement window.
type phase struct {
	changes int
	cpu     time.Duration
	bytes   int64
	rss     int64
}

func itoa(n int) string { return strconv.Itoa(n) }

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

func kib(b int64) string {
	if b >= 1<<20 {
		return mib(b)
	}
	return fmt.Sprintf("%.1f KiB", float64(b)/(1<<10))
}

func printTable(w io.Writer, o options, version string, rs []result) {
	row := func(name string, f func(r result) string) {
		cells := []string{name}
		for _, r := range rs {
			cells = append(cells, f(r))
		}
		fmt.Fprintln(w, "| "+strings.Join(cells, " | ")+" |")
	}
	header := []string{"smeshd for one node"}
	sep := []string{"---"}
	for _, r := range rs {
		header = append(header, fmt.Sprintf("%d nodes", r.nodes))
		sep = append(sep, "---:")
	}
	fmt.Fprintf(w, "kube-apiserver %s, %d CPUs; smeshd watches %s; churn: %d pod label patches/s for %s\n\n",
		version, runtime.NumCPU(), ownNode, o.rate, o.window)
	fmt.Fprintln(w, "| "+strings.Join(header, " | ")+" |")
	fmt.Fprintln(w, "|"+strings.Join(sep, "|")+"|")
	row("Pods in the cluster (namespaces)", func(r result) string {
		s := fmt.Sprintf("%d (%d)", r.pods, r.namespaces)
		if r.truncated {
			s += " (fill timed out)"
		}
		return s
	})
	row("Pods on smeshd's node", func(r result) string { return itoa(r.ownPods) })
	row("Filling (objects/s)", func(r result) string {
		return fmt.Sprintf("%s (%.0f/s)", r.fill.Round(time.Second), float64(r.made)/r.fill.Seconds())
	})
	row("Time to ready: first pod list logged", func(r result) string { return r.listed.Round(time.Millisecond).String() })
	row("Time to ready: /readyz 200", func(r result) string { return r.ready.Round(time.Millisecond).String() })
	row("RSS at ready (of it: file pages; Go heap in use)", func(r result) string {
		return fmt.Sprintf("%s (%s; %s)", mib(r.readyRSS), mib(r.readyFile), mib(r.readyHeap))
	})
	row("RSS after the churns (peak)", func(r result) string { return fmt.Sprintf("%s (%s)", mib(r.own.rss), mib(r.peakRSS)) })
	row("Requests to the API server (audit log)", func(r result) string {
		d, n := describeRequests(r.requests)
		return fmt.Sprintf("%d: %s", n, d)
	})
	row("Received from the API server: start to ready", func(r result) string { return kib(r.readyBytes) })
	row("Received: whole run", func(r result) string { return kib(r.totalBytes) })
	for _, p := range []struct {
		name string
		get  func(result) phase
	}{
		{"idle", func(r result) phase { return r.idle }},
		{"churn on other nodes", func(r result) phase { return r.other }},
		{"churn on its own node", func(r result) phase { return r.own }},
	} {
		row(fmt.Sprintf("CPU, %s (%s): smeshd CPU-seconds, received", p.name, o.window), func(r result) string {
			ph := p.get(r)
			s := fmt.Sprintf("%.2f s, %s", ph.cpu.Seconds(), kib(ph.bytes))
			if ph.changes > 0 {
				s += fmt.Sprintf(" (%d changes)", ph.changes)
			}
			return s
		})
	}
}
