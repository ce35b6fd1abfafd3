// Package governance is the home of the clean room's governance hooks. What
// is built is the hash-chained, append-only audit log and its verifier
// (subpackage audit; `cleanwall audit verify`), which the key broker and the
// daemon write to. Consent checks and confidential telemetry are not built
// yet: they come with the governance issue (issue 17), and nothing here
// checks consent or filters telemetry today.
package governance
