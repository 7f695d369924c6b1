// Package config loads mmiobrokerd's configuration: a TOML file (see docs/config.md) with a
// [daemon] table (sockets, access mode, logging), a [limits] table and one [[device]] table
// per leasable PCI device.
//
// Decoding is strict: a key the schema does not know is an error, reported with its line and
// column, and so is a value of the wrong type. Every key has a default, so an empty file (or
// no file at all, see [Load]) is a valid configuration with no devices.
//
// The life of a configuration in the daemon:
//
//	cfg, err := config.LoadIfExists(path)      // decode over the defaults (Load: must exist)
//	cfg.Override("log_level", "debug")         // command-line flags, if any
//	cfg.AddDevice("0000:3b:00.0")
//	res, err := cfg.Resolve(config.OSLookup()) // Validate (every problem at once, with file
//	                                           // lines), names -> ids, broker.Config
//
// Nothing in this package opens devices or sockets.
package config
