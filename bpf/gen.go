package bpf

// The C sources are compiled by bpf2go into datapath_bpfel.{go,o}, which are
// committed: `go build` needs neither clang nor root. The Makefile pins the
// compiler (BPF2GO_CC=clang-19) and the flags (BPF2GO_CFLAGS).
//go:generate go tool bpf2go -target bpfel -type sandbox_key -type sandbox -type rule_key -type rule -type config -type verdict_cache_key -type cached_verdict -type counter_key -type counter -type deny_event -type verdict -type reason -type listener -type sandbox_flags -type steer_key -type steer datapath datapath.c
