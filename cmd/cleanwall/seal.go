package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/cleanwall/cleanwall/proxies/seal"
	"github.com/cleanwall/cleanwall/proxies/seal/hpke"
)

const sealUsage = `Usage:
  cleanwall seal seal --key-file FILE --key-id ID [--key-version N] [--context S] [-o OUT] [IN]
  cleanwall seal open --key-file FILE [-v] [--context S] [-o OUT] [IN]
  cleanwall seal open --hpke-key FILE [-v] [--context S] [-o OUT] [IN]
  cleanwall seal keygen --private-key FILE --public-key FILE [--suite xwing|x25519]

The other end of a Clean Room's sealed traffic, outside it. The formats are
docs/sealing.md. IN defaults to stdin, OUT to stdout.

Secure mode (--key-file): the closed loop of a data key. Seal what goes in (a
file a sandbox will GET), open what came out (an object a sandbox PUT, a
sealed TCP stream recorded). FILE holds the raw 32-byte data key.

seal: --key-id and --key-version name the key in the header as the key broker
does (versions count from 1), so that the Clean Room's proxy asks its key
source for the same key. --context is bound into the object and shown in clear
in its header: a secure proxy opens only objects carrying the context it expects.

Trusted mode (--hpke-key): bodies a trusted proxy sealed to your public key.
FILE is the private key file keygen wrote.

keygen: writes a key pair for trusted mode's HPKE sealing: the private key
(mode 0600) stays with you, the public key goes to the Clean Room's policy.
--suite xwing (the default: ML-KEM-768 + X25519, post-quantum) or x25519 (for
recipients whose HPKE has no X-Wing). It never overwrites a file, and prints
the key id that bodies sealed to the key carry.

open: everything else it needs (key id, version, salt, context; for HPKE the
suite, key id, encapsulated key) is in the object's header; -v prints the
header on stderr. --context S refuses an object sealed under another context
(an HPKE body carries only the context's SHA-256, so this is how to check it).
Every segment (chunk) is verified before a byte of it is written. A tampered,
truncated or extended object, or the wrong key, exits 1:
  with -o, the plaintext goes to a temporary file next to OUT, renamed to OUT
    only when the whole object verified; a refused object leaves OUT untouched;
  on stdout, only verified segments are written, but a refusal can come after
    some were: a non-zero exit status means discard what was written.
`

// cmdSeal seals or opens a secure-mode object with a data key held in a
// file, opens a trusted-mode HPKE body with a private key file, or makes
// such a key pair.
func cmdSeal(args []string) error {
	return sealCommand(args, os.Stdin, os.Stdout, os.Stderr)
}

func sealCommand(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stderr, sealUsage)
		if len(args) == 0 {
			return &exitError{2}
		}
		return nil
	}
	if args[0] == "keygen" {
		return sealKeygen(args[1:], stdout, stderr)
	}
	fs := flag.NewFlagSet("cleanwall seal "+args[0], flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	keyFile := fs.String("key-file", "", "file holding the raw 32-byte data key")
	out := fs.String("o", "", "output file (default stdout)")
	var keyID, context, hpkeKeyFile string
	var keyVersion int
	var verbose bool
	switch args[0] {
	case "seal":
		fs.StringVar(&keyID, "key-id", "", "the data key's id (required)")
		fs.IntVar(&keyVersion, "key-version", 1, "the data key's version")
		fs.StringVar(&context, "context", "", "context bound into the object (clear text in its header)")
	case "open":
		fs.BoolVar(&verbose, "v", false, "print the object's header on stderr")
		fs.StringVar(&hpkeKeyFile, "hpke-key", "", "trusted mode: the HPKE private key file")
		fs.StringVar(&context, "context", "", "refuse an object sealed under another context")
	default:
		return fail("unknown seal command %q: seal, open or keygen (cleanwall seal -h)", args[0])
	}
	if err := fs.Parse(args[1:]); errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(stderr, sealUsage)
		return nil
	} else if err != nil {
		return fail("seal %s: %v (cleanwall seal -h)", args[0], err)
	}
	contextSet := false
	fs.Visit(func(f *flag.Flag) { contextSet = contextSet || f.Name == "context" })
	switch {
	case *keyFile != "" && hpkeKeyFile != "":
		return fail("seal open: --key-file (secure mode) and --hpke-key (trusted mode) exclude each other")
	case *keyFile == "" && hpkeKeyFile == "" && args[0] == "open":
		return fail("seal open: --key-file (secure mode) or --hpke-key (trusted mode) is required")
	case *keyFile == "" && hpkeKeyFile == "":
		return fail("seal %s: --key-file is required", args[0])
	}
	if fs.NArg() > 1 {
		return fail("seal %s: one input at most, got %q", args[0], fs.Args())
	}
	if args[0] == "seal" && keyID == "" {
		return fail("seal seal: --key-id is required")
	}
	var key []byte
	var hpkeKey *hpke.PrivateKey
	var err error
	if hpkeKeyFile != "" {
		hpkeKey, err = readHPKEPrivateKey(hpkeKeyFile)
	} else {
		key, err = readKeyFile(*keyFile)
	}
	if err != nil {
		return err
	}

	in, inName := stdin, "stdin"
	if fs.NArg() == 1 && fs.Arg(0) != "-" {
		f, err := os.Open(fs.Arg(0))
		if err != nil {
			return err
		}
		defer f.Close()
		in, inName = f, fs.Arg(0)
	}
	// The opener reads a frame header, then a segment: buffer the small reads.
	in = bufio.NewReaderSize(in, 64<<10)

	var process func(w io.Writer) error
	switch {
	case hpkeKey != nil:
		process = func(w io.Writer) error {
			var o *hpke.Opener
			if contextSet {
				o = hpke.NewOpener(in, hpkeKey, context).(*hpke.Opener)
			} else {
				o = hpke.NewOpenerAnyContext(in, hpkeKey)
			}
			p, err := o.Prefix()
			if err != nil {
				return fmt.Errorf("%s: %w", inName, err)
			}
			if verbose {
				fmt.Fprintf(stderr, "%s: HPKE %s, key %s, context sha256 %x, chunks of %d bytes\n",
					inName, p.Suite, p.KeyID, p.ContextDigest, p.ChunkSize)
			}
			if _, err := o.WriteTo(w); err != nil {
				return fmt.Errorf("%s: %w", inName, err)
			}
			return nil
		}
	case args[0] == "seal":
		c := seal.SealConfig{Key: key, KeyID: keyID, KeyVersion: keyVersion, Context: context}
		process = func(w io.Writer) error {
			s, err := seal.NewSealer(w, c)
			if err != nil {
				return err
			}
			if _, err := s.ReadFrom(in); err != nil {
				return err
			}
			return s.Close()
		}
	default:
		var opts []seal.OpenOption
		if contextSet {
			opts = append(opts, seal.WithContext(context))
		}
		process = func(w io.Writer) error {
			o := seal.NewOpener(in, func(string, int) ([]byte, error) { return key, nil }, opts...)
			h, err := o.Header()
			if err != nil {
				return fmt.Errorf("%s: %w", inName, err)
			}
			if verbose {
				kind := "fixed segments"
				if h.Interactive {
					kind = "interactive (flushed) segments"
				}
				fmt.Fprintf(stderr, "%s: key %q version %d, context %q, %s of %d bytes\n",
					inName, h.KeyID, h.KeyVersion, h.Context, kind, h.SegmentSize)
			}
			if _, err := o.WriteTo(w); err != nil {
				return fmt.Errorf("%s: %w", inName, err)
			}
			return nil
		}
	}
	if *out == "" {
		return process(stdout)
	}
	return writeAtomically(*out, process)
}

// sealKeygen writes a new HPKE key pair for trusted mode.
func sealKeygen(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("cleanwall seal keygen", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	privFile := fs.String("private-key", "", "where to write the private key (mode 0600)")
	pubFile := fs.String("public-key", "", "where to write the public key")
	suiteName := fs.String("suite", hpke.DefaultSuite.String(), "xwing or x25519")
	if err := fs.Parse(args); errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(stderr, sealUsage)
		return nil
	} else if err != nil {
		return fail("seal keygen: %v (cleanwall seal -h)", err)
	}
	switch {
	case *privFile == "" || *pubFile == "":
		return fail("seal keygen: --private-key and --public-key are required")
	case filepath.Clean(*privFile) == filepath.Clean(*pubFile):
		return fail("seal keygen: --private-key and --public-key name the same file")
	case fs.NArg() > 0:
		return fail("seal keygen: unexpected arguments %q", fs.Args())
	}
	suite, err := hpke.ParseSuite(*suiteName)
	if err != nil {
		return fail("seal keygen: --suite: %v", err)
	}
	// Check both before writing either, so that a refusal leaves nothing.
	for _, p := range []string{*privFile, *pubFile} {
		if _, err := os.Lstat(p); err == nil {
			return fail("seal keygen: %s exists: keygen never overwrites a key file", p)
		}
	}
	priv, err := hpke.GenerateKey(suite)
	if err != nil {
		return err
	}
	if err := writeNewFile(*privFile, priv.Marshal(), 0o600); err != nil {
		return err
	}
	if err := writeNewFile(*pubFile, priv.Public().Marshal(), 0o644); err != nil {
		os.Remove(*privFile) // ours: it was created just now, exclusively
		return err
	}
	fmt.Fprintf(stdout, "suite %s, key id %s\nprivate key: %s (keep it; nothing else can open what is sealed to it)\npublic key:  %s\n",
		suite, priv.Public().ID(), *privFile, *pubFile)
	return nil
}

// writeNewFile creates path with perm and data, refusing an existing file
// (O_EXCL, so a file appearing since the check is not overwritten either).
func writeNewFile(path string, data []byte, perm os.FileMode) (err error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(path)
		}
	}()
	if _, err = f.Write(data); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	return f.Close()
}

// readHPKEPrivateKey reads a trusted-mode private key file.
func readHPKEPrivateKey(path string) (*hpke.PrivateKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	k, err := hpke.ParsePrivateKey(data)
	if err != nil {
		return nil, fail("--hpke-key %s: %v", path, err)
	}
	return k, nil
}

// readKeyFile reads a raw 32-byte data key.
func readKeyFile(path string) ([]byte, error) {
	key, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(key) != seal.KeySize {
		return nil, fail("key file %s holds %d bytes: it must hold the raw %d-byte data key (no encoding, no newline)", path, len(key), seal.KeySize)
	}
	return key, nil
}

// writeAtomically runs write into a temporary file next to path and
// renames it to path only when write succeeded, so that path never holds a
// partial or unverified result.
func writeAtomically(path string, write func(io.Writer) error) (err error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".partial-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	w := bufio.NewWriterSize(tmp, 64<<10)
	if err = write(w); err != nil {
		return err
	}
	if err = w.Flush(); err != nil {
		return err
	}
	if err = tmp.Sync(); err != nil {
		return err
	}
	if err = tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
