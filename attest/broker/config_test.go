package broker_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/attest/broker"
)

// specConfig is the example of docs/keybroker.md §4, with real-looking values.
const specConfig = `
listen: 127.0.0.1:8443
tls: {certFile: broker.pem, keyFile: broker.key}
allowSimulatedTEE: false          # true only for tests and demos; logged loudly
keyStore:
  dir: /var/lib/cleanwall-keybroker        # keys sealed at rest
  masterKeyFile: /etc/cleanwall-keybroker/master.key   # 0600, 32 bytes
keys:
  - id: egress-dek
    release:
      anyOf:                       # at least one entry; each entry needs every field
        - tee: snp
          measurements: ["` + measurementHex + `"]
          hostData: "` + hostHex + `"
          minimumTCB: {bootloader: 3, tee: 0, snp: 8, microcode: 115}
          minimumFirmware: "1.55"
          debug: false
          vmpl: 0
          allowedChipIDs: []       # empty list: any chip
`

const (
	measurementHex = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f"
	hostHex        = "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
)

func TestParseSpecConfig(t *testing.T) {
	cfg, err := broker.ParseConfig([]byte(specConfig))
	if err != nil {
		t.Fatal(err)
	}
	refs := cfg.Release["egress-dek"]
	if len(refs) != 1 {
		t.Fatalf("release policies: %+v", cfg.Release)
	}
	r := refs[0]
	if len(r.Measurements) != 1 || r.Measurements[0][47] != 0x2f || r.HostData[0] != 0xa0 || r.MinimumTCB.SNP != 8 ||
		r.MinimumTCB.Microcode != 115 || r.MinimumFirmware.Minor != 55 || r.Debug || r.VMPL != 0 || r.AllowedChipIDs != nil {
		t.Fatalf("reference values %+v", r)
	}
	// Unquoted YAML numbers for the firmware version read the same.
	cfg, err = broker.ParseConfig([]byte(strings.Replace(specConfig, `"1.55"`, `1.55`, 1)))
	if err != nil || cfg.Release["egress-dek"][0].MinimumFirmware.Minor != 55 {
		t.Fatalf("unquoted firmware: %v", err)
	}
	cfg, err = broker.ParseConfig([]byte(specConfig + "releaseValidity: 15m\nchallenges: {ttl: 30s, maxUsed: 5, auditInterval: 1m}\n" +
		"verification: {checkRevocations: false}\nsimulatedProductLines: [Genoa, Turin]\n"))
	if err != nil || cfg.ReleaseValidity != 15*time.Minute || cfg.Challenges.TTL != 30*time.Second || *cfg.Verification.CheckRevocations ||
		cfg.Challenges.MaxUsed != 5 || cfg.Challenges.AuditInterval != time.Minute || strings.Join(cfg.SimulatedProductLines, ",") != "Genoa,Turin" {
		t.Fatalf("extensions: %+v %v", cfg, err)
	}
	if r := cfg.Release["egress-dek"][0]; r.EgressPolicies != nil {
		t.Fatalf("no egressPolicies member: %x, want nil (no binding)", r.EgressPolicies)
	}
	// §5: an entry may bind the key to egress policies.
	cfg, err = broker.ParseConfig([]byte(strings.Replace(specConfig, "allowedChipIDs: []",
		"allowedChipIDs: []\n          egressPolicies: [\""+policyHex+"\", \""+strings.ToUpper(policyHex)+"\"]", 1)))
	if err != nil {
		t.Fatal(err)
	}
	if e := cfg.Release["egress-dek"][0].EgressPolicies; len(e) != 2 || e[0][0] != 0xe5 || e[1][31] != 0xbf {
		t.Fatalf("egressPolicies %x", e)
	}
}

const policyHex = "e5a75ce4acc5b9b2601b9b07f87de1b174c2442e6aea8b4865babe687cd1c2bf"

func TestConfigErrorsNameTheField(t *testing.T) {
	drop := func(line string) string {
		if !strings.Contains(specConfig, line) {
			panic(line)
		}
		return strings.Replace(specConfig, line, "", 1)
	}
	for _, tc := range []struct {
		name, config, want string
	}{
		{"minimumTCB", drop("          minimumTCB: {bootloader: 3, tee: 0, snp: 8, microcode: 115}\n"), "keys[0].release.anyOf[0].minimumTCB: required"},
		{"measurements", drop(`          measurements: ["` + measurementHex + `"]` + "\n"), "keys[0].release.anyOf[0].measurements: required"},
		{"hostData", drop(`          hostData: "` + hostHex + `"` + "\n"), "keys[0].release.anyOf[0].hostData: required"},
		{"minimumFirmware", drop("          minimumFirmware: \"1.55\"\n"), "keys[0].release.anyOf[0].minimumFirmware: required"},
		{"debug", drop("          debug: false\n"), "keys[0].release.anyOf[0].debug: required"},
		{"vmpl", drop("          vmpl: 0\n"), "keys[0].release.anyOf[0].vmpl: required"},
		{"allowedChipIDs", drop("          allowedChipIDs: []       # empty list: any chip\n"), "keys[0].release.anyOf[0].allowedChipIDs: required"},
		{"tee", strings.Replace(specConfig, "- tee: snp\n          measurements", "- measurements", 1), "keys[0].release.anyOf[0].tee: required"},
		{"tcb component", strings.Replace(specConfig, "snp: 8, ", "", 1), "keys[0].release.anyOf[0].minimumTCB.snp: required"},
		{"null member", strings.Replace(specConfig, "vmpl: 0", "vmpl: ~", 1), "keys[0].release.anyOf[0].vmpl: required"},
		{"empty measurements", strings.Replace(specConfig, `["`+measurementHex+`"]`, "[]", 1), "measurements: at least one"},
		{"short measurement", strings.Replace(specConfig, measurementHex, "abcd", 1), "measurements[0]: 4 hex characters, want 96"},
		{"bad hex", strings.Replace(specConfig, hostHex, strings.Repeat("zz", 32), 1), "hostData: not hex"},
		{"tee", strings.Replace(specConfig, "tee: snp", "tee: tdx", 1), `tee: "tdx": only "snp"`},
		{"vmpl range", strings.Replace(specConfig, "vmpl: 0", "vmpl: 4", 1), "vmpl: 4: want 0-3"},
		{"tcb range", strings.Replace(specConfig, "snp: 8", "snp: 200", 1), "minimumTCB.snp: 200: want 0-127"},
		{"firmware", strings.Replace(specConfig, `"1.55"`, `"latest"`, 1), "minimumFirmware: firmware version"},
		{"no entries", strings.Split(specConfig, "        - tee")[0], "keys[0].release.anyOf: at least one entry"},
		{"unknown member", strings.Replace(specConfig, "debug: false", "debug: false\n          secureBoot: true", 1), "field secureBoot not found"},
		{"listen", strings.Replace(specConfig, "listen: 127.0.0.1:8443", "", 1), "listen: required"},
		{"master key", strings.Replace(specConfig, "masterKeyFile: /etc/cleanwall-keybroker/master.key", "", 1), "keyStore.masterKeyFile: required"},
		{"key id", strings.Replace(specConfig, "id: egress-dek", "id: ../etc", 1), `keys[0].id: "../etc"`},
		{"two documents", specConfig + "---\nlisten: x\n", "more than one YAML document"},
		{"old challenge cap", specConfig + "challenges: {maxOutstanding: 5}\n", "challenges.maxOutstanding: no longer supported"},
		{"negative maxUsed", specConfig + "challenges: {maxUsed: -1}\n", "challenges.maxUsed: negative"},
		{"unknown product line", specConfig + "simulatedProductLines: [Milan, Venice]\n", `simulatedProductLines[1]: "Venice": want one of Milan, Genoa, Turin`},
		{"no product line", specConfig + "simulatedProductLines: []\n", "simulatedProductLines: empty"},
		{"empty egressPolicies", strings.Replace(specConfig, "allowedChipIDs: []", "allowedChipIDs: []\n          egressPolicies: []", 1), "anyOf[0].egressPolicies: empty"},
		{"short egress policy", strings.Replace(specConfig, "allowedChipIDs: []", "allowedChipIDs: []\n          egressPolicies: [\"abcd\"]", 1), "anyOf[0].egressPolicies[0]: malformed egress policy hash: 4 characters"},
		{"null egressPolicies", strings.Replace(specConfig, "allowedChipIDs: []", "allowedChipIDs: []\n          egressPolicies:", 1), "anyOf[0].egressPolicies: want a list"},
		{"one egress policy, not a list", strings.Replace(specConfig, "allowedChipIDs: []", "allowedChipIDs: []\n          egressPolicies: "+policyHex, 1), "anyOf[0].egressPolicies: want a list"},
		{"null egress policy", strings.Replace(specConfig, "allowedChipIDs: []", "allowedChipIDs: []\n          egressPolicies: [\""+policyHex+"\", ~]", 1), "anyOf[0].egressPolicies[1]: want a hash"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := broker.ParseConfig([]byte(tc.config))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to say %q", err, tc.want)
			}
		})
	}
	// Every problem is reported, each as a FieldError.
	_, err := broker.ParseConfig([]byte(strings.Replace(strings.Replace(specConfig, "vmpl: 0", "", 1), "debug: false", "", 1)))
	var fe *broker.FieldError
	if !errors.As(err, &fe) || !strings.Contains(err.Error(), "debug: required") || !strings.Contains(err.Error(), "vmpl: required") {
		t.Fatalf("err = %v, want both missing fields", err)
	}
}
