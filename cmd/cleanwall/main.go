// Command cleanwall is cleanwall's CLI: run a command in an enforced
// sandbox, check and apply policies, and see what the kernel enforces.
package main

import (
	"errors"
	"fmt"
	"os"
)

var version = "dev"

const usage = `cleanwall — egress enforcement for clean-room sandboxes

Usage:
  cleanwall run --policy FILE [--name NAME] [--metrics-addr ADDR] [--cni-bin-dir DIR] -- COMMAND [ARGS...]
  cleanwall gc
  cleanwall policy check FILE
  cleanwall policy apply --sandbox ID FILE
  cleanwall policy show --sandbox ID
  cleanwall sandboxes
  cleanwall status [--live] [--json]
  cleanwall observe [--sandbox ID] [--verdict V] [--reason R] [--rule NAME] [--proto P] [--output table|json] [--pcap FILE] [--count N]
  cleanwall cni install|uninstall [--bin-dir DIR] [--conf-dir DIR] [--name FILE] [--socket PATH]
  cleanwall attest status
  cleanwall audit verify [--node-key KEY|FILE] [--partial] FILE...|DIR
  cleanwall audit show [--sandbox ID] [--kind K] [--since DURATION|RFC3339] [--json] [FILE...|DIR]
  cleanwall audit sink --listen ADDR --cert FILE --key FILE --dir DIR [--node-keys FILE]
  cleanwall consent refresh [--sandbox ID]
  cleanwall seal seal --key-file FILE --key-id ID [--key-version N] [--context S] [-o OUT] [IN]
  cleanwall seal open --key-file FILE [-v] [--context S] [-o OUT] [IN]
  cleanwall seal open --hpke-key FILE [-v] [--context S] [-o OUT] [IN]
  cleanwall seal keygen --private-key FILE --public-key FILE [--suite xwing|x25519]
  cleanwall volume seal|open --kind files|block --key-file FILE [--key-id ID [--key-version N]] SRC DST
  cleanwall version

Commands that talk to cleanwalld take --socket (default /run/cleanwall/cleanwalld.sock).
`

// exitError carries an exit status up to main.
type exitError struct{ code int }

func (e *exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case sandboxInitCmd: // cleanwall run's own init, not in the usage
		return sandboxInit(args[1:])
	case "run":
		err = cmdRun(args[1:])
	case "gc":
		err = cmdGC(args[1:])
	case "policy":
		err = cmdPolicy(args[1:])
	case "sandboxes":
		err = cmdSandboxes(args[1:])
	case "status":
		err = cmdStatus(args[1:])
	case "cni":
		err = cmdCNI(args[1:])
	case "attest":
		err = cmdAttest(args[1:])
	case "audit":
		err = cmdAudit(args[1:])
	case "observe":
		err = cmdObserve(args[1:])
	case "consent":
		err = cmdConsent(args[1:])
	case "seal":
		err = cmdSeal(args[1:])
	case "volume":
		err = cmdVolume(args[1:])
	case "version":
		fmt.Println("cleanwall", version)
	case "-h", "--help", "help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "cleanwall: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "cleanwall:", err)
		return 1
	}
	return 0
}
