package journal

import "errors"

// Sentinel errors; test with errors.Is.
var (
	// ErrLocked: another process (normally a second mmiobrokerd) holds the journal file's
	// lock, and it was not released within Options.Timeout.
	ErrLocked = errors.New("journal is locked by another process")
	// ErrInvalid: a Commit was refused because its input is inconsistent (sequence
	// numbers not ascending or not above the last stored one, a lease without id, an id
	// both upserted and dropped). Nothing was written.
	ErrInvalid = errors.New("invalid commit")
	// ErrCorrupt: a stored record cannot be decoded; see [RecordError].
	ErrCorrupt = errors.New("corrupt journal record")
	// ErrClosed: the journal has been closed.
	ErrClosed = errors.New("journal closed")
)

// Error is the error of a journal operation. Err is one of the sentinel errors above, a
// [*RecordError], or an error from bbolt or the file system.
type Error struct {
	Op   string // "open", "load", "commit", "reset", "close"
	Path string // the journal file
	Err  error
}

func (e *Error) Error() string { return "journal " + e.Op + " " + e.Path + ": " + e.Err.Error() }

// Unwrap returns the underlying error.
func (e *Error) Unwrap() error { return e.Err }

// opError wraps err as an [*Error]; it returns nil for nil.
func opError(op, path string, err error) error {
	if err == nil {
		return nil
	}
	return &Error{Op: op, Path: path, Err: err}
}
