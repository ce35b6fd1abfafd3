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
)

const sealUsage = `Usage:
  cleanwall seal seal --key-file FILE --key-id ID [--key-version N] [--context S] [-o OUT] [IN]
  cleanwall seal open --key-file FILE [-v] [-o OUT] [IN]

The other end of a secure-mode closed loop, outside the Clean Room: seal what
goes in (a file a sandbox will GET), open what came out (an object a sandbox
PUT, a sealed TCP stream recorded). The format is docs/sealing.md. FILE holds
the raw 32-byte data key. IN defaults to stdin, OUT to stdout.

seal: --key-id and --key-version name the key in the header as the key broker
does (versions count from 1), so that the Clean Room's proxy asks its key
source for the same key. --context is bound into the object and shown in clear
in its header: a secure proxy opens only objects carrying the context it expects.

open: everything else it needs (key id, version, salt, context) is in the
object's header; -v prints the header on stderr. Every segment is verified
before a byte of it is written. A tampered, truncated or extended object, or
the wrong key, exits 1:
  with -o, the plaintext goes to a temporary file next to OUT, renamed to OUT
    only when the whole object verified; a refused object leaves OUT untouched;
  on stdout, only verified segments are written, but a refusal can come after
    some were: a non-zero exit status means discard what was written.
`

// cmdSeal seals or opens a secure-mode object with a data key held in a file.
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
	fs := flag.NewFlagSet("cleanwall seal "+args[0], flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	keyFile := fs.String("key-file", "", "file holding the raw 32-byte data key (required)")
	out := fs.String("o", "", "output file (default stdout)")
	// Trusted mode's HPKE sealing to a customer's public key will add
	// --hpke-key here (docs/sealing.md keeps its heading); not implemented.
	var keyID, context string
	var keyVersion int
	var verbose bool
	switch args[0] {
	case "seal":
		fs.StringVar(&keyID, "key-id", "", "the data key's id (required)")
		fs.IntVar(&keyVersion, "key-version", 1, "the data key's version")
		fs.StringVar(&context, "context", "", "context bound into the object (clear text in its header)")
	case "open":
		fs.BoolVar(&verbose, "v", false, "print the object's header on stderr")
	default:
		return fail("unknown seal command %q: seal or open (cleanwall seal -h)", args[0])
	}
	if err := fs.Parse(args[1:]); errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(stderr, sealUsage)
		return nil
	} else if err != nil {
		return fail("seal %s: %v (cleanwall seal -h)", args[0], err)
	}
	if *keyFile == "" {
		return fail("seal %s: --key-file is required", args[0])
	}
	if fs.NArg() > 1 {
		return fail("seal %s: one input at most, got %q", args[0], fs.Args())
	}
	if args[0] == "seal" && keyID == "" {
		return fail("seal seal: --key-id is required")
	}
	key, err := readKeyFile(*keyFile)
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
	if args[0] == "seal" {
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
	} else {
		process = func(w io.Writer) error {
			o := seal.NewOpener(in, func(string, int) ([]byte, error) { return key, nil })
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
