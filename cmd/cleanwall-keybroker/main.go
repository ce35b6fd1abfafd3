// Command cleanwall-keybroker is the attestation-gated key release service
// of docs/keybroker.md.
//
//	cleanwall-keybroker --config FILE [--allow-simulated-tee] [--check]
//	cleanwall-keybroker key create --config FILE --id ID
//
// It parses its flags with its own flag.FlagSet: go-sev-guest registers
// global flags in the packages the broker imports, and they must not show up
// in (or be settable through) this command's flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/cleanwall/cleanwall/attest/broker"
	"github.com/cleanwall/cleanwall/attest/broker/keystore"
)

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
}

const usage = `usage:
  cleanwall-keybroker --config FILE [--allow-simulated-tee] [--check]
  cleanwall-keybroker key create --config FILE --id ID
`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	logger := slog.New(slog.NewTextHandler(stderr, nil))
	if len(args) > 0 && args[0] == "key" {
		return keyCommand(args[1:], stdout, stderr, logger)
	}
	fs := flag.NewFlagSet("cleanwall-keybroker", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usage, "\nflags:\n")
		fs.PrintDefaults()
	}
	configPath := fs.String("config", "", "broker configuration file (YAML, docs/keybroker.md §4)")
	allowSim := fs.Bool("allow-simulated-tee", false, "trust simulated SEV-SNP evidence (go-sev-guest's test-only AMD roots); tests and demos only, same as allowSimulatedTEE: true")
	check := fs.Bool("check", false, "load the configuration, key store and audit log, report, and exit")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *configPath == "" || fs.NArg() > 0 {
		fs.Usage()
		return 2
	}
	cfg, err := broker.LoadConfig(*configPath)
	if err != nil {
		logger.Error("configuration refused", "error", err)
		return 1
	}
	if *allowSim {
		cfg.AllowSimulatedTEE = true
	}
	srv, err := broker.Open(cfg, logger)
	if err != nil {
		logger.Error("cannot start", "error", err)
		return 1
	}
	defer srv.Close()
	if *check {
		fmt.Fprintf(stdout, "configuration, key store and audit log OK: %d keys, allowSimulatedTEE=%v, listen %s\n",
			len(cfg.Keys), cfg.AllowSimulatedTEE, cfg.Listen)
		return 0
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		logger.Error("cannot listen", "error", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for {
			select {
			case <-hup:
				if err := srv.ReloadKeys(); err != nil {
					logger.Error("reloading keys failed; serving the keys loaded before", "error", err)
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	logger.Info("key broker listening", "listen", ln.Addr().String(), "allowSimulatedTEE", cfg.AllowSimulatedTEE)
	if err := srv.Serve(ctx, ln); err != nil {
		logger.Error("serving failed", "error", err)
		return 1
	}
	return 0
}

func keyCommand(args []string, stdout, stderr io.Writer, logger *slog.Logger) int {
	if len(args) == 0 || args[0] != "create" {
		fmt.Fprint(stderr, usage)
		return 2
	}
	flags := flag.NewFlagSet("cleanwall-keybroker key create", flag.ContinueOnError)
	flags.SetOutput(stderr)
	configPath := flags.String("config", "", "broker configuration file")
	id := flags.String("id", "", "key id (must be one of the configuration's keys)")
	if err := flags.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *configPath == "" || *id == "" || flags.NArg() > 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	cfg, err := broker.LoadConfig(*configPath)
	if err != nil {
		logger.Error("configuration refused", "error", err)
		return 1
	}
	if _, ok := cfg.Release[*id]; !ok {
		logger.Error("key is not in the configuration: add it under keys with its release policy first", "keyID", *id)
		return 1
	}
	master, err := keystore.LoadMasterKey(cfg.KeyStore.MasterKeyFile)
	if errors.Is(err, fs.ErrNotExist) {
		if err := keystore.CreateMasterKey(cfg.KeyStore.MasterKeyFile); err != nil {
			logger.Error("cannot create master key", "error", err)
			return 1
		}
		logger.Warn("created a new master key; back it up: without it the key store cannot be opened", "file", cfg.KeyStore.MasterKeyFile)
		master, err = keystore.LoadMasterKey(cfg.KeyStore.MasterKeyFile)
	}
	if err != nil {
		logger.Error("cannot load master key", "error", err)
		return 1
	}
	store, err := keystore.Open(cfg.KeyStore.Dir, master)
	if err != nil {
		logger.Error("cannot open key store", "error", err)
		return 1
	}
	version, err := store.Create(*id)
	if err != nil {
		logger.Error("cannot create key", "error", err)
		return 1
	}
	logger.Info("key version created; send SIGHUP to a running broker to serve it", "keyID", *id, "version", version)
	fmt.Fprintln(stdout, version)
	return 0
}
