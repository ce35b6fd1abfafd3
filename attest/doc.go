// Package attest owns TEE evidence (SEV-SNP through go-sev-guest, and a
// simulated SNP attester that is always labelled as such), its verification
// against release policies, and the key broker's server and client.
//
// This package itself holds the key release protocol v1 of docs/keybroker.md that
// both sides share: the Attester interface, the REPORT_DATA derivation, the
// HPKE suite and info, the wire messages with their strict decoder, and the
// refusal codes. It depends on the standard library only, so the daemon can
// import it without pulling in go-sev-guest (whose packages register global
// flags). It must not touch hardware, the network or the disk.
//
// The subpackages:
//
//	attest/snp               SEV-SNP evidence framing, chain verification, release-policy evaluation
//	attest/snp/guest         the hardware attester (go-sev-guest quote provider)
//	attest/simulated         the simulated attester, any product line, VCEK or VLEK (tests and demos only; links test keys)
//	attest/simulated/simroots  public certificates of the simulated chains, one per product line (no keys)
//	attest/broker            the key broker service and its configuration
//	attest/broker/keystore   keys sealed at rest under the master key
//	attest/broker/client     the runtime's client: ReleaseWith(ctx, keyID, ReleaseOptions{PolicySHA256})
package attest
