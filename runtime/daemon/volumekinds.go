package daemon

// The volume kinds a daemon serves register their openers (volumes.Open)
// from their init functions.
import (
	_ "github.com/cleanwall/cleanwall/volumes/block"
	_ "github.com/cleanwall/cleanwall/volumes/files"
)
