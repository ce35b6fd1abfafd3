package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	"github.com/cleanwall/cleanwall/volumes/files"
)

const volumeUsage = `Usage:
  cleanwall volume seal --kind KIND --key-file FILE --key-id ID [--key-version N] SRC STORE
  cleanwall volume open --kind KIND --key-file FILE STORE DST

The other end of a Clean Room's encrypted volumes (spec.volumes), outside it,
for the holder of the volume's data key: prepare a store before a run, read
one after. No FUSE and no daemon are involved. The formats are
docs/volumes.md. FILE holds the raw 32-byte data key.

seal: encrypts SRC into a new store at STORE (which must not exist or be
empty). --key-id and --key-version name the key as the key broker does
(versions count from 1): the Clean Room mounts the store only with that key.

open: decrypts STORE into DST (which must not exist or be empty), after
checking every name, header and block. It writes into a temporary directory
next to DST, renamed to DST only when the whole store verified: any damaged,
truncated, swapped, misplaced or foreign file, or the wrong key, exits 1
naming the file and leaves DST as it was.

`

// volumeKind is one kind of volume the volume command handles. seal and
// open get the arguments after "seal" or "open" with the --kind flag and
// its value taken out (flags and positional arguments otherwise in the
// order given), and report usage errors through fail (exit 2) and refusals
// as plain errors (exit 1). Kinds add themselves to volumeKinds: files is
// defined here, block from an init in volume_block.go
// (volumeKinds["block"] = volumeKind{...}).
type volumeKind struct {
	// usage is the kind's part of `cleanwall volume -h`.
	usage      string
	seal, open func(args []string, stdout, stderr io.Writer) error
}

// volumeKinds are the kinds `cleanwall volume` serves, by --kind value.
var volumeKinds = map[string]volumeKind{
	"files": {
		usage: "Files volumes (--kind files; format: docs/volumes.md): SRC and DST are\ndirectories of plain files (directories and regular files only); STORE is\nthe store directory.\n",
		seal:  volumeFilesSeal,
		open:  volumeFilesOpen,
	},
}

func cmdVolume(args []string) error { return volumeCommand(args, os.Stdout, os.Stderr) }

func volumeUsageText() string {
	var b strings.Builder
	b.WriteString(volumeUsage)
	kinds := make([]string, 0, len(volumeKinds))
	for k := range volumeKinds {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	for _, k := range kinds {
		b.WriteString("\n" + volumeKinds[k].usage)
	}
	return b.String()
}

func volumeCommand(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stderr, volumeUsageText())
		if len(args) == 0 {
			return &exitError{2}
		}
		return nil
	}
	if args[0] != "seal" && args[0] != "open" {
		return fail("unknown volume command %q: seal or open (cleanwall volume -h)", args[0])
	}
	// Find --kind among the arguments; the rest goes to the kind.
	kind, rest := "", make([]string, 0, len(args))
	for i := 1; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--kind" || a == "-kind":
			if i+1 == len(args) {
				return fail("volume %s: --kind needs a value", args[0])
			}
			kind = args[i+1]
			i++
		case strings.HasPrefix(a, "--kind=") || strings.HasPrefix(a, "-kind="):
			kind = a[strings.Index(a, "=")+1:]
		default:
			rest = append(rest, a)
		}
	}
	if kind == "" {
		return fail("volume %s: --kind is required (cleanwall volume -h)", args[0])
	}
	k, ok := volumeKinds[kind]
	if !ok {
		return fail("volume %s: unknown --kind %q (cleanwall volume -h)", args[0], kind)
	}
	if args[0] == "seal" {
		return k.seal(rest, stdout, stderr)
	}
	return k.open(rest, stdout, stderr)
}

// volumeKeyFlags parses the key flags of seal (withID) or open and
// expects two positional arguments.
func volumeKeyFlags(cmd string, args []string, withID bool) (key []byte, keyID string, keyVersion int, pos []string, err error) {
	fs := flag.NewFlagSet("cleanwall volume "+cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	keyFile := fs.String("key-file", "", "file holding the raw 32-byte data key")
	if withID {
		fs.StringVar(&keyID, "key-id", "", "the data key's id (required)")
		fs.IntVar(&keyVersion, "key-version", 1, "the data key's version")
	}
	if err := fs.Parse(args); err != nil {
		return nil, "", 0, nil, fail("volume %s: %v (cleanwall volume -h)", cmd, err)
	}
	if *keyFile == "" {
		return nil, "", 0, nil, fail("volume %s: --key-file is required", cmd)
	}
	if withID && keyID == "" {
		return nil, "", 0, nil, fail("volume %s: --key-id is required", cmd)
	}
	if withID && keyVersion < 1 {
		return nil, "", 0, nil, fail("volume %s: --key-version must be 1 or more", cmd)
	}
	if fs.NArg() != 2 {
		return nil, "", 0, nil, fail("volume %s: want two arguments, got %q (cleanwall volume -h)", cmd, fs.Args())
	}
	key, err = readKeyFile(*keyFile)
	if err != nil {
		return nil, "", 0, nil, err
	}
	return key, keyID, keyVersion, fs.Args(), nil
}

func volumeFilesSeal(args []string, stdout, stderr io.Writer) error {
	key, keyID, keyVersion, pos, err := volumeKeyFlags("seal", args, true)
	if err != nil {
		return err
	}
	if err := files.SealTree(pos[0], pos[1], files.Key{ID: keyID, Version: keyVersion, Key: key}); err != nil {
		return fmt.Errorf("volume seal: %w", err)
	}
	return nil
}

func volumeFilesOpen(args []string, stdout, stderr io.Writer) error {
	key, _, _, pos, err := volumeKeyFlags("open", args, false)
	if err != nil {
		return err
	}
	if err := files.OpenTree(pos[0], pos[1], key); err != nil {
		var de *files.DamageError
		if errors.As(err, &de) {
			return fmt.Errorf("volume open: refused, nothing written to %s: %w", pos[1], err)
		}
		return fmt.Errorf("volume open: %w", err)
	}
	return nil
}
