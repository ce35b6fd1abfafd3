// Package governance is the home of the clean room's governance hooks:
//
//   - audit: the hash-chained, append-only audit log with signed
//     checkpoints (an Ed25519 node key bound into key release), rotation,
//     forwarding to an HTTPS sink, and its verifier (`cleanwall audit
//     verify|show|sink`; docs/audit.md);
//   - consent: the consent protocol's client and answer cache
//     (shared/GOVERNANCE.md; wired in runtime/daemon/consent.go and
//     runtime/dispatch; docs/consent.md);
//   - telemetry: the optional OTLP/HTTP export of the daemon's metrics
//     (docs/telemetry.md says what every signal carries and never carries).
package governance
