// Package bench is cleanwall's benchmark suite: every scenario measures a
// baseline and cleanwall side by side in the same run, in interleaved
// rounds, and reports medians and their ratio (see README.md).
//
// The scenarios need root, namespaces and BPF, take minutes, and are
// compiled only with the build tag "bench" (make bench), so that `go test
// ./...` never runs them. Without the tag only the unit tests of the
// statistics and rule-set generators run.
//
// It owns tests/bench and never changes the product: a scenario drives the
// real CNI chain, a real cleanwalld process and real tools (iperf3,
// iptables-restore) inside namespaces it made.
package bench
