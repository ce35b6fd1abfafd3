// Package policy owns the user-facing egress policy language (POLICY.md):
// types, strict YAML parsing, validation with field paths, and compilation
// into datapath entries and proxy rules. It must not touch the kernel.
package policy
