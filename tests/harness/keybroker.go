package harness

import (
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/cleanwall/cleanwall/attest/simulated"
	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/internal/testutil"
)

// KeyBroker is a cleanwall-keybroker process in the node namespace on
// 127.0.0.1 with a test CA.
type KeyBroker struct {
	URL    string
	CAFile string
	Dir    string
	cmd    *exec.Cmd
}

// KeyBrokerOptions configure the broker.
type KeyBrokerOptions struct {
	// AllowSimulated trusts simulated evidence (allowSimulatedTEE).
	AllowSimulated bool
	// Measurement overrides the release policy's measurement (hex); the
	// default is the simulated attester's own.
	Measurement string
	// Keys are the key ids to create (default egress-dek).
	Keys []string
	// ReleaseValidity sets how long a released key is valid
	// (releaseValidity); zero keeps the broker's default (1h).
	ReleaseValidity time.Duration
}

// StartKeyBroker writes a configuration whose release policy the
// simulated attester satisfies (unless told otherwise), creates the keys
// and runs the broker until the test ends.
func (e *Env) StartKeyBroker(o KeyBrokerOptions) *KeyBroker {
	e.T.Helper()
	dir := filepath.Join(e.Dir, "keybroker")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		e.T.Fatal(err)
	}
	testutil.TestCA(e.T, dir, "broker")
	if len(o.Keys) == 0 {
		o.Keys = []string{"egress-dek"}
	}
	c := simulated.DefaultConfig()
	meas := hex.EncodeToString(c.Measurement[:])
	if o.Measurement != "" {
		meas = o.Measurement
	}
	port := 18443 + int(seq.Load()%1000)
	var keys strings.Builder
	for _, id := range o.Keys {
		fmt.Fprintf(&keys, `  - id: %s
    release:
      anyOf:
        - tee: snp
          measurements: ["%s"]
          hostData: "%s"
          minimumTCB: {bootloader: %d, tee: %d, snp: %d, microcode: %d}
          minimumFirmware: "%d.%d"
          debug: false
          vmpl: 0
          allowedChipIDs: []
`, id, meas, hex.EncodeToString(c.HostData[:]), c.TCB.Bootloader, c.TCB.TEE, c.TCB.SNP, c.TCB.Microcode, c.Firmware.Major, c.Firmware.Minor)
	}
	cfg := fmt.Sprintf(`listen: 127.0.0.1:%d
tls: {certFile: broker.pem, keyFile: broker.key}
allowSimulatedTEE: %v
keyStore:
  dir: keys
  masterKeyFile: master.key
verification: {checkRevocations: false, fetchCertificates: false}
keys:
%s`, port, o.AllowSimulated, keys.String())
	if o.ReleaseValidity > 0 {
		cfg += fmt.Sprintf("releaseValidity: %s\n", o.ReleaseValidity)
	}
	cfgPath := filepath.Join(dir, "broker.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		e.T.Fatal(err)
	}
	bin := filepath.Join(e.Bin, "cleanwall-keybroker")
	for _, id := range o.Keys {
		if out, err := exec.Command(bin, "key", "create", "--config", cfgPath, "--id", id).CombinedOutput(); err != nil {
			e.T.Fatalf("key create: %v\n%s", err, out)
		}
	}
	kb := &KeyBroker{URL: fmt.Sprintf("https://127.0.0.1:%d", port), CAFile: filepath.Join(dir, "ca.pem"), Dir: dir}
	kb.cmd = exec.Command(bin, "--config", cfgPath)
	logf, _ := os.Create(filepath.Join(dir, "broker.log"))
	kb.cmd.Stdout, kb.cmd.Stderr = logf, logf
	if err := netns.Do(e.Node, kb.cmd.Start); err != nil {
		e.T.Fatal(err)
	}
	e.onCleanup(func() {
		_ = kb.cmd.Process.Signal(syscall.SIGTERM)
		_, _ = kb.cmd.Process.Wait()
		logf.Close()
	})
	ok := Eventually(10*time.Second, func() bool {
		var c net.Conn
		err := e.InNode(func() (err error) {
			c, err = tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{InsecureSkipVerify: true})
			return err
		})
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	if !ok {
		log, _ := os.ReadFile(filepath.Join(dir, "broker.log"))
		e.T.Fatalf("key broker did not come up:\n%s", log)
	}
	return kb
}

// Log returns the broker's output (its audit goes to its key store dir).
func (k *KeyBroker) Log() string {
	b, _ := os.ReadFile(filepath.Join(k.Dir, "broker.log"))
	return string(b)
}
