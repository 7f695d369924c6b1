package dmabuf

import (
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// TestUAPI compares the constants this package mirrors with test/uapi/linux-7.2.txt,
// which test/uapi prints from the Linux 7.2 source's own uapi headers and checks in the
// rig. It also fails for a kernel constant declared in this package but missing here.
// The rest of dma-buf.h (the sync ioctls and their structs) is not mirrored.
func TestUAPI(t *testing.T) {
	testutil.CheckUAPI(t, testutil.UAPISpec{
		Dir:     ".",
		Headers: []string{"linux/dma-buf.h", "linux/magic.h"},
		Consts: map[string]uint64{
			"DMA_BUF_MAGIC":      DMA_BUF_MAGIC,
			"DMA_BUF_SET_NAME_B": DMA_BUF_SET_NAME_B,
			"DMA_BUF_NAME_LEN":   DMA_BUF_NAME_LEN,
		},
		NotMirrored: []string{
			"DMA_BUF_SET_NAME", // the same request number as DMA_BUF_SET_NAME_B on 64-bit
			"DMA_BUF_SET_NAME_A",
			"DMA_BUF_IOCTL_SYNC",
			"DMA_BUF_IOCTL_EXPORT_SYNC_FILE",
			"DMA_BUF_IOCTL_IMPORT_SYNC_FILE",
			"DMA_BUF_SYNC_READ",
			"DMA_BUF_SYNC_WRITE",
			"DMA_BUF_SYNC_END",
			"dma_buf_sync",
			"dma_buf_export_sync_file",
			"dma_buf_import_sync_file",
		},
	})
}
