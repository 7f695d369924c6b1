/*
 * layout.c prints the kernel facts that mmiobroker's Go code restates, read from the uapi
 * headers it is compiled against: the size and alignment of every mirrored struct, the
 * offset, size and type of each of its fields, and the value of every mirrored constant and
 * ioctl request number. The headers are the Linux 7.2 source's own (make headers of
 * linux-source-7.2, installed by test/vm/setup.sh). Facts that docs/kernel.md states but the
 * Go code does not mirror are printed too, so the document's tables are checked as well.
 *
 * test/uapi/uapi_test.go builds it with gcc -Wall -Wextra -Werror -I $UAPI_INCLUDE, runs it
 * and compares the output with test/uapi/linux-7.2.txt, which the layout tests of
 * internal/vfio, internal/iommufd and internal/kvm read (internal/testutil/uapi.go).
 *
 * Output: comment lines starting with '#', then one fact per line, sorted by byte value:
 *
 *   <header> const <NAME> <value>      decimal
 *   <header> ioctl <NAME> 0x<hex>      a request number
 *   <header> absent <NAME>             a macro the Go code knows that the headers lack
 *   <header> struct <tag> size <n> align <n>
 *   <header> field <tag>.<field> offset <n> size <n> type <type>
 *
 * <header> is the header that defines the fact. <type> is u8, u16, u32, u64, s8, s16, s32,
 * s64 or the tag of a struct; a flexible array member has type <element type>[] and the size
 * of one element.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <linux/dma-buf.h>
#include <linux/iommufd.h>
#include <linux/kvm.h>
#include <linux/magic.h>
#include <linux/pci_regs.h>
#include <linux/version.h>
#include <linux/vfio.h>

#define MAX_LINES 512
#define LINE_LEN 160

static char lines[MAX_LINES][LINE_LEN];
static size_t nlines;

/* emit adds one fact; main sorts them. */
static void __attribute__((format(printf, 1, 2))) emit(const char *format, ...)
{
	va_list ap;
	int n;

	if (nlines == MAX_LINES) {
		fprintf(stderr, "layout: more than %d lines\n", MAX_LINES);
		exit(1);
	}
	va_start(ap, format);
	n = vsnprintf(lines[nlines], LINE_LEN, format, ap);
	va_end(ap);
	if (n < 0 || n >= LINE_LEN) {
		fprintf(stderr, "layout: line %zu too long\n", nlines);
		exit(1);
	}
	nlines++;
}

/* scalar names the integer type of an expression; NULL for anything else. */
#define scalar(x)                                                            \
	_Generic((x), __u8: "u8", __u16: "u16", __u32: "u32", __u64: "u64",  \
		 __s8: "s8", __s16: "s16", __s32: "s32", __s64: "s64",       \
		 default: NULL)

static void field(const char *hdr, const char *tag, const char *name, size_t off,
		  size_t size, const char *type, const char *suffix)
{
	if (type == NULL) {
		fprintf(stderr, "layout: %s.%s: not an integer; use SFIELD or SFLEX\n", tag, name);
		exit(1);
	}
	emit("%s field %s.%s offset %zu size %zu type %s%s", hdr, tag, name, off, size, type,
	     suffix);
}

#define member(s, f) (((struct s *)0)->f)

/* STRUCT prints the size and alignment of struct s. */
#define STRUCT(h, s) \
	emit("%s struct %s size %zu align %zu", h, #s, sizeof(struct s), _Alignof(struct s))

/* FIELD prints integer field f of struct s. */
#define FIELD(h, s, f) \
	field(h, #s, #f, offsetof(struct s, f), sizeof(member(s, f)), scalar(member(s, f)), "")

/* SFIELD prints field f of struct s, which is a struct t. */
#define SFIELD(h, s, f, t)                                                               \
	do {                                                                             \
		_Static_assert(__builtin_types_compatible_p(__typeof__(member(s, f)),   \
							    struct t),                   \
			       #s "." #f " is not a struct " #t);                        \
		field(h, #s, #f, offsetof(struct s, f), sizeof(member(s, f)), #t, "");  \
	} while (0)

/* FLEX prints flexible array member f of struct s, an array of integers. */
#define FLEX(h, s, f)                                                                  \
	field(h, #s, #f, offsetof(struct s, f), sizeof(member(s, f)[0]),               \
	      scalar(member(s, f)[0]), "[]")

/* SFLEX prints flexible array member f of struct s, an array of struct t. */
#define SFLEX(h, s, f, t)                                                                \
	do {                                                                             \
		_Static_assert(__builtin_types_compatible_p(__typeof__(member(s, f)[0]),  \
							    struct t),                   \
			       #s "." #f " is not an array of struct " #t);              \
		field(h, #s, #f, offsetof(struct s, f), sizeof(member(s, f)[0]), #t, "[]"); \
	} while (0)

#define CONST(h, c) emit("%s const %s %llu", h, #c, (unsigned long long)(c))
#define IOCTL(h, c) emit("%s ioctl %s 0x%llx", h, #c, (unsigned long long)(c))
#define ABSENT(h, c) emit("%s absent %s", h, #c)

static int compare(const void *a, const void *b)
{
	return strcmp(a, b);
}

static void vfio(void)
{
	const char *h = "linux/vfio.h";

	IOCTL(h, VFIO_GET_API_VERSION);
	IOCTL(h, VFIO_CHECK_EXTENSION);
	IOCTL(h, VFIO_SET_IOMMU);
	IOCTL(h, VFIO_GROUP_GET_STATUS);
	IOCTL(h, VFIO_GROUP_SET_CONTAINER);
	IOCTL(h, VFIO_GROUP_UNSET_CONTAINER);
	IOCTL(h, VFIO_GROUP_GET_DEVICE_FD);
	IOCTL(h, VFIO_DEVICE_GET_INFO);
	IOCTL(h, VFIO_DEVICE_GET_REGION_INFO);
	IOCTL(h, VFIO_DEVICE_GET_IRQ_INFO);
	IOCTL(h, VFIO_DEVICE_SET_IRQS);
	IOCTL(h, VFIO_DEVICE_RESET);
	IOCTL(h, VFIO_DEVICE_FEATURE);
	IOCTL(h, VFIO_DEVICE_BIND_IOMMUFD);
	IOCTL(h, VFIO_DEVICE_ATTACH_IOMMUFD_PT);
	IOCTL(h, VFIO_DEVICE_DETACH_IOMMUFD_PT);
	/* Documented in docs/kernel.md, not called by the code. */
	IOCTL(h, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO);
	IOCTL(h, VFIO_DEVICE_PCI_HOT_RESET);
	IOCTL(h, VFIO_DEVICE_IOEVENTFD);
	IOCTL(h, VFIO_IOMMU_GET_INFO);
	IOCTL(h, VFIO_IOMMU_MAP_DMA);
	IOCTL(h, VFIO_IOMMU_UNMAP_DMA);

	CONST(h, VFIO_API_VERSION);
	CONST(h, VFIO_TYPE1_IOMMU);
	CONST(h, VFIO_TYPE1v2_IOMMU);
	CONST(h, VFIO_NOIOMMU_IOMMU);
	CONST(h, VFIO_GROUP_FLAGS_VIABLE);
	CONST(h, VFIO_GROUP_FLAGS_CONTAINER_SET);
	CONST(h, VFIO_DEVICE_FLAGS_RESET);
	CONST(h, VFIO_DEVICE_FLAGS_PCI);
	CONST(h, VFIO_DEVICE_FLAGS_CAPS);
	CONST(h, VFIO_REGION_INFO_FLAG_READ);
	CONST(h, VFIO_REGION_INFO_FLAG_WRITE);
	CONST(h, VFIO_REGION_INFO_FLAG_MMAP);
	CONST(h, VFIO_REGION_INFO_FLAG_CAPS);
	CONST(h, VFIO_REGION_INFO_CAP_SPARSE_MMAP);
	CONST(h, VFIO_REGION_INFO_CAP_TYPE);
	CONST(h, VFIO_REGION_INFO_CAP_MSIX_MAPPABLE);
	CONST(h, VFIO_PCI_BAR0_REGION_INDEX);
	CONST(h, VFIO_PCI_BAR5_REGION_INDEX);
	CONST(h, VFIO_PCI_ROM_REGION_INDEX);
	CONST(h, VFIO_PCI_CONFIG_REGION_INDEX);
	CONST(h, VFIO_PCI_VGA_REGION_INDEX);
	CONST(h, VFIO_PCI_NUM_REGIONS);
	CONST(h, VFIO_PCI_INTX_IRQ_INDEX);
	CONST(h, VFIO_PCI_MSI_IRQ_INDEX);
	CONST(h, VFIO_PCI_MSIX_IRQ_INDEX);
	CONST(h, VFIO_PCI_ERR_IRQ_INDEX);
	CONST(h, VFIO_PCI_REQ_IRQ_INDEX);
	CONST(h, VFIO_PCI_NUM_IRQS);
	CONST(h, VFIO_IRQ_INFO_EVENTFD);
	CONST(h, VFIO_IRQ_INFO_MASKABLE);
	CONST(h, VFIO_IRQ_INFO_AUTOMASKED);
	CONST(h, VFIO_IRQ_INFO_NORESIZE);
	CONST(h, VFIO_IRQ_SET_DATA_NONE);
	CONST(h, VFIO_IRQ_SET_DATA_BOOL);
	CONST(h, VFIO_IRQ_SET_DATA_EVENTFD);
	CONST(h, VFIO_IRQ_SET_ACTION_MASK);
	CONST(h, VFIO_IRQ_SET_ACTION_UNMASK);
	CONST(h, VFIO_IRQ_SET_ACTION_TRIGGER);
	CONST(h, VFIO_DEVICE_FEATURE_MASK);
	CONST(h, VFIO_DEVICE_FEATURE_GET);
	CONST(h, VFIO_DEVICE_FEATURE_SET);
	CONST(h, VFIO_DEVICE_FEATURE_PROBE);
	CONST(h, VFIO_DEVICE_FEATURE_DMA_BUF);
	/* Documented in docs/kernel.md, not used by the code. */
	CONST(h, VFIO_DEVICE_BIND_FLAG_TOKEN);
	CONST(h, VFIO_DEVICE_ATTACH_PASID);
	CONST(h, VFIO_DEVICE_DETACH_PASID);
	/* Proposed (v3 of "vfio/pci: DMABUF mmap and explicit revoke"), not merged. */
#ifdef VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE
	CONST(h, VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE);
#else
	ABSENT(h, VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE);
#endif

	STRUCT(h, vfio_group_status);
	FIELD(h, vfio_group_status, argsz);
	FIELD(h, vfio_group_status, flags);

	STRUCT(h, vfio_device_info);
	FIELD(h, vfio_device_info, argsz);
	FIELD(h, vfio_device_info, flags);
	FIELD(h, vfio_device_info, num_regions);
	FIELD(h, vfio_device_info, num_irqs);
	FIELD(h, vfio_device_info, cap_offset);
	FIELD(h, vfio_device_info, pad);

	STRUCT(h, vfio_region_info);
	FIELD(h, vfio_region_info, argsz);
	FIELD(h, vfio_region_info, flags);
	FIELD(h, vfio_region_info, index);
	FIELD(h, vfio_region_info, cap_offset);
	FIELD(h, vfio_region_info, size);
	FIELD(h, vfio_region_info, offset);

	STRUCT(h, vfio_info_cap_header);
	FIELD(h, vfio_info_cap_header, id);
	FIELD(h, vfio_info_cap_header, version);
	FIELD(h, vfio_info_cap_header, next);

	STRUCT(h, vfio_region_info_cap_sparse_mmap);
	SFIELD(h, vfio_region_info_cap_sparse_mmap, header, vfio_info_cap_header);
	FIELD(h, vfio_region_info_cap_sparse_mmap, nr_areas);
	FIELD(h, vfio_region_info_cap_sparse_mmap, reserved);
	SFLEX(h, vfio_region_info_cap_sparse_mmap, areas, vfio_region_sparse_mmap_area);

	STRUCT(h, vfio_region_sparse_mmap_area);
	FIELD(h, vfio_region_sparse_mmap_area, offset);
	FIELD(h, vfio_region_sparse_mmap_area, size);

	STRUCT(h, vfio_region_info_cap_type);
	SFIELD(h, vfio_region_info_cap_type, header, vfio_info_cap_header);
	FIELD(h, vfio_region_info_cap_type, type);
	FIELD(h, vfio_region_info_cap_type, subtype);

	STRUCT(h, vfio_irq_info);
	FIELD(h, vfio_irq_info, argsz);
	FIELD(h, vfio_irq_info, flags);
	FIELD(h, vfio_irq_info, index);
	FIELD(h, vfio_irq_info, count);

	STRUCT(h, vfio_irq_set);
	FIELD(h, vfio_irq_set, argsz);
	FIELD(h, vfio_irq_set, flags);
	FIELD(h, vfio_irq_set, index);
	FIELD(h, vfio_irq_set, start);
	FIELD(h, vfio_irq_set, count);
	FLEX(h, vfio_irq_set, data);

	STRUCT(h, vfio_device_feature);
	FIELD(h, vfio_device_feature, argsz);
	FIELD(h, vfio_device_feature, flags);
	FLEX(h, vfio_device_feature, data);

	STRUCT(h, vfio_device_feature_dma_buf);
	FIELD(h, vfio_device_feature_dma_buf, region_index);
	FIELD(h, vfio_device_feature_dma_buf, open_flags);
	FIELD(h, vfio_device_feature_dma_buf, flags);
	FIELD(h, vfio_device_feature_dma_buf, nr_ranges);
	SFLEX(h, vfio_device_feature_dma_buf, dma_ranges, vfio_region_dma_range);

	STRUCT(h, vfio_region_dma_range);
	FIELD(h, vfio_region_dma_range, offset);
	FIELD(h, vfio_region_dma_range, length);

	STRUCT(h, vfio_device_bind_iommufd);
	FIELD(h, vfio_device_bind_iommufd, argsz);
	FIELD(h, vfio_device_bind_iommufd, flags);
	FIELD(h, vfio_device_bind_iommufd, iommufd);
	FIELD(h, vfio_device_bind_iommufd, out_devid);
	FIELD(h, vfio_device_bind_iommufd, token_uuid_ptr);

	STRUCT(h, vfio_device_attach_iommufd_pt);
	FIELD(h, vfio_device_attach_iommufd_pt, argsz);
	FIELD(h, vfio_device_attach_iommufd_pt, flags);
	FIELD(h, vfio_device_attach_iommufd_pt, pt_id);
	FIELD(h, vfio_device_attach_iommufd_pt, pasid);

	STRUCT(h, vfio_device_detach_iommufd_pt);
	FIELD(h, vfio_device_detach_iommufd_pt, argsz);
	FIELD(h, vfio_device_detach_iommufd_pt, flags);
	FIELD(h, vfio_device_detach_iommufd_pt, pasid);
}

static void pci_regs(void)
{
	const char *h = "linux/pci_regs.h";

	CONST(h, PCI_VENDOR_ID);
	CONST(h, PCI_DEVICE_ID);
	CONST(h, PCI_COMMAND);
	CONST(h, PCI_COMMAND_MEMORY);
	CONST(h, PCI_COMMAND_MASTER);
}

static void iommufd(void)
{
	const char *h = "linux/iommufd.h";

	IOCTL(h, IOMMU_DESTROY);
	IOCTL(h, IOMMU_IOAS_ALLOC);
	IOCTL(h, IOMMU_IOAS_MAP);
	IOCTL(h, IOMMU_IOAS_UNMAP);
	IOCTL(h, IOMMU_IOAS_MAP_FILE);
	/* Documented in docs/kernel.md, not called by the code. */
	IOCTL(h, IOMMU_IOAS_IOVA_RANGES);
	IOCTL(h, IOMMU_OPTION);

	CONST(h, IOMMU_IOAS_MAP_FIXED_IOVA);
	CONST(h, IOMMU_IOAS_MAP_WRITEABLE);
	CONST(h, IOMMU_IOAS_MAP_READABLE);

	STRUCT(h, iommu_destroy);
	FIELD(h, iommu_destroy, size);
	FIELD(h, iommu_destroy, id);

	STRUCT(h, iommu_ioas_alloc);
	FIELD(h, iommu_ioas_alloc, size);
	FIELD(h, iommu_ioas_alloc, flags);
	FIELD(h, iommu_ioas_alloc, out_ioas_id);

	STRUCT(h, iommu_ioas_map_file);
	FIELD(h, iommu_ioas_map_file, size);
	FIELD(h, iommu_ioas_map_file, flags);
	FIELD(h, iommu_ioas_map_file, ioas_id);
	FIELD(h, iommu_ioas_map_file, fd);
	FIELD(h, iommu_ioas_map_file, start);
	FIELD(h, iommu_ioas_map_file, length);
	FIELD(h, iommu_ioas_map_file, iova);

	STRUCT(h, iommu_ioas_unmap);
	FIELD(h, iommu_ioas_unmap, size);
	FIELD(h, iommu_ioas_unmap, ioas_id);
	FIELD(h, iommu_ioas_unmap, iova);
	FIELD(h, iommu_ioas_unmap, length);
}

static void kvm(void)
{
	const char *h = "linux/kvm.h";

	CONST(h, KVMIO);
	CONST(h, KVM_API_VERSION);
	IOCTL(h, KVM_GET_API_VERSION);
	IOCTL(h, KVM_CREATE_VM);
	IOCTL(h, KVM_CHECK_EXTENSION);
	IOCTL(h, KVM_CREATE_DEVICE);
	CONST(h, KVM_CAP_USER_MEMORY2);
	CONST(h, KVM_CAP_MEMORY_ATTRIBUTES);
	CONST(h, KVM_CAP_GUEST_MEMFD);
	CONST(h, KVM_CAP_VM_TYPES);
	CONST(h, KVM_CAP_GUEST_MEMFD_FLAGS);
	CONST(h, KVM_CREATE_DEVICE_TEST);
	CONST(h, KVM_DEV_TYPE_VFIO);
	CONST(h, KVM_MEMORY_ATTRIBUTE_PRIVATE);
	CONST(h, GUEST_MEMFD_FLAG_MMAP);
	CONST(h, GUEST_MEMFD_FLAG_INIT_SHARED);

	STRUCT(h, kvm_create_device);
	FIELD(h, kvm_create_device, type);
	FIELD(h, kvm_create_device, fd);
	FIELD(h, kvm_create_device, flags);

	h = "asm/kvm.h";
	CONST(h, KVM_X86_DEFAULT_VM);
	CONST(h, KVM_X86_SW_PROTECTED_VM);
	CONST(h, KVM_X86_SEV_VM);
	CONST(h, KVM_X86_SEV_ES_VM);
	CONST(h, KVM_X86_SNP_VM);
	CONST(h, KVM_X86_TDX_VM);
}

/* dma-buf facts of docs/kernel.md §4 (internal/dmabuf restates some of them). */
static void dma_buf(void)
{
	const char *h = "linux/dma-buf.h";

	IOCTL(h, DMA_BUF_IOCTL_SYNC);
	IOCTL(h, DMA_BUF_SET_NAME);
	IOCTL(h, DMA_BUF_SET_NAME_A);
	IOCTL(h, DMA_BUF_SET_NAME_B);
	IOCTL(h, DMA_BUF_IOCTL_EXPORT_SYNC_FILE);
	IOCTL(h, DMA_BUF_IOCTL_IMPORT_SYNC_FILE);
	CONST(h, DMA_BUF_NAME_LEN);
	CONST(h, DMA_BUF_SYNC_READ);
	CONST(h, DMA_BUF_SYNC_WRITE);
	CONST(h, DMA_BUF_SYNC_END);

	STRUCT(h, dma_buf_sync);
	FIELD(h, dma_buf_sync, flags);
	STRUCT(h, dma_buf_export_sync_file);
	FIELD(h, dma_buf_export_sync_file, flags);
	FIELD(h, dma_buf_export_sync_file, fd);
	STRUCT(h, dma_buf_import_sync_file);
	FIELD(h, dma_buf_import_sync_file, flags);
	FIELD(h, dma_buf_import_sync_file, fd);

	CONST("linux/magic.h", DMA_BUF_MAGIC);
}

int main(void)
{
	size_t i;

	CONST("linux/version.h", LINUX_VERSION_MAJOR);
	CONST("linux/version.h", LINUX_VERSION_PATCHLEVEL);
	vfio();
	pci_regs();
	iommufd();
	kvm();
	dma_buf();
	qsort(lines, nlines, LINE_LEN, compare);

	printf("# Kernel uapi facts that mmiobroker's Go code restates, printed by\n"
	       "# test/uapi/testdata/layout.c (which describes the format) from the uapi headers\n"
	       "# of Linux %d.%d, x86_64. DO NOT EDIT; regenerate with\n"
	       "#   MMIOBROKER_VM=1 go test ./test/uapi -update\n",
	       LINUX_VERSION_MAJOR, LINUX_VERSION_PATCHLEVEL);
	for (i = 0; i < nlines; i++) {
		if (i > 0 && strcmp(lines[i - 1], lines[i]) == 0) {
			fprintf(stderr, "layout: duplicate line: %s\n", lines[i]);
			return 1;
		}
		puts(lines[i]);
	}
	return ferror(stdout) ? 1 : 0;
}
