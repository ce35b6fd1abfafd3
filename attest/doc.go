// Package attest owns TEE evidence (SEV-SNP through go-sev-guest, and a
// simulated SNP attester that is always labelled as such), its verification
// against release policies, and the key broker's server and client.
package attest
