// Package governance holds the clean room's governance hooks: consent checks,
// the hash-chained audit log (subpackage audit) and telemetry rules.
package governance
