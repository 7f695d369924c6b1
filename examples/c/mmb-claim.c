/*
 * mmb-claim.c: claim a lease's dma-buf fd from mmiobrokerd (claim protocol version 1,
 * docs/claim-protocol.md), written from that document alone.
 *
 *   usage: mmb-claim SOCKET LEASE_ID TOKEN [COMMAND [ARG]...]
 *
 * It claims LEASE_ID with TOKEN on the claim socket SOCKET and prints one line describing
 * the fd it received: the reply's fields, then what the kernel says of the fd
 * (close-on-exec, and /proc/self/fdinfo's size, exp_name and name; "-" where absent).
 * With a COMMAND it then executes COMMAND with the fd as fd 3 and MMIO_LEASE_ID,
 * MMIO_LEASE_FD, MMIO_LEASE_BDF, MMIO_LEASE_BAR, MMIO_LEASE_SIZE, MMIO_LEASE_INODE and
 * MMIO_LEASE_GENERATION in its environment, as `mmiobrokerctl allocate -exec` does.
 *
 * The claim must come from the process that allocated the lease (§7). Exec keeps the
 * process, so a launcher that allocates over gRPC can exec mmb-claim, and mmb-claim can
 * exec the VMM, which can then claim a reissued generation itself (or exec mmb-claim
 * again with the new token).
 *
 * Exit status:
 *   0        claimed (with a COMMAND: the COMMAND's own status)
 *   1        a system call failed or timed out (connect, send, receive)
 *   2        bad command line, or a lease id or token the protocol cannot carry
 *   3        the server broke the protocol; every fd it sent was closed
 *   10+code  the server refused the claim with that error code: 11 INVALID_REQUEST,
 *            12 UNSUPPORTED_VERSION, 13 NOT_FOUND, 14 BAD_TOKEN, 15 EXPIRED,
 *            16 PERMISSION_DENIED, 17 FAILED_PRECONDITION, 18 RESOURCE_EXHAUSTED,
 *            19 UNAVAILABLE (also when the server hung up without a reply), 20 INTERNAL
 *   30       an error code newer than this client
 *   127      COMMAND could not be executed
 *
 * Build: gcc -std=c11 -O2 -Wall -Wextra -Werror -o mmb-claim mmb-claim.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define MMB_REQ_FIXED   20
#define MMB_REP_FIXED   56
#define MMB_MAX_ID      128
#define MMB_MAX_TOKEN   256
#define MMB_MAX_BDF     32
#define MMB_MAX_MSG     1024
#define MMB_MAX_REQUEST (MMB_REQ_FIXED + MMB_MAX_ID + MMB_MAX_TOKEN)            /* 404 */
#define MMB_MAX_REPLY   (MMB_REP_FIXED + MMB_MAX_ID + MMB_MAX_BDF + MMB_MAX_MSG) /* 1240 */
#define MMB_CTL_FDS     4   /* room for more fds than allowed, to detect a bad reply */

/* The reply codes (§5). */
enum {
	MMB_OK, MMB_INVALID_REQUEST, MMB_UNSUPPORTED_VERSION, MMB_NOT_FOUND, MMB_BAD_TOKEN,
	MMB_EXPIRED, MMB_PERMISSION_DENIED, MMB_FAILED_PRECONDITION, MMB_RESOURCE_EXHAUSTED,
	MMB_UNAVAILABLE, MMB_INTERNAL,
};

static const char *const mmb_code_names[] = {
	"OK", "INVALID_REQUEST", "UNSUPPORTED_VERSION", "NOT_FOUND", "BAD_TOKEN", "EXPIRED",
	"PERMISSION_DENIED", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
	"INTERNAL",
};

#define MMB_NCODES (sizeof mmb_code_names / sizeof mmb_code_names[0])

struct mmb_reply {
	uint32_t code;                  /* MMB_OK, else the error code of a refusal */
	uint64_t generation, size, inode;
	uint32_t bar;
	char lease_id[MMB_MAX_ID + 1];  /* NUL-terminated copies of the reply's strings */
	char bdf[MMB_MAX_BDF + 1];
	char message[MMB_MAX_MSG + 1];  /* the refusal, or what broke the protocol */
};

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)v); put16(p + 2, (uint16_t)(v >> 16)); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p) { return get16(p) | (uint32_t)get16(p + 2) << 16; }
static uint64_t get64(const uint8_t *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }

/* printable: lease ids, tokens and BDFs are bytes 0x21-0x7e (§3). */
static int printable(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i] < 0x21 || p[i] > 0x7e)
			return 0;
	return 1;
}

/* utf8: messages are UTF-8 (§3); reject overlong forms, surrogates, > U+10FFFF. */
static int utf8(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n;) {
		size_t k;
		uint32_t cp, min;
		if (p[i] < 0x80) {
			i++;
			continue;
		} else if ((p[i] & 0xe0) == 0xc0) {
			k = 1, cp = p[i] & 0x1f, min = 0x80;
		} else if ((p[i] & 0xf0) == 0xe0) {
			k = 2, cp = p[i] & 0x0f, min = 0x800;
		} else if ((p[i] & 0xf8) == 0xf0) {
			k = 3, cp = p[i] & 0x07, min = 0x10000;
		} else {
			return 0;
		}
		if (n - i <= k)
			return 0;
		for (size_t j = 1; j <= k; j++) {
			if ((p[i + j] & 0xc0) != 0x80)
				return 0;
			cp = cp << 6 | (p[i + j] & 0x3f);
		}
		if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
			return 0;
		i += k + 1;
	}
	return 1;
}

/*
 * mmb_exchange sends the request req of len bytes on a new connection to path and
 * receives the reply into rep (replen bytes) and every fd that came with it into fds
 * (*nfds of them; *bad is set if there were more than MMB_CTL_FDS, which are closed).
 * It returns the reply's size (0: end of file) or -1 with errno set. The socket is closed.
 */
static ssize_t mmb_exchange(const char *path, const uint8_t *req, size_t len, uint8_t *rep,
			    size_t replen, int *msg_flags, int fds[MMB_CTL_FDS], int *nfds, int *bad)
{
	*nfds = 0, *bad = 0;
	int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (s < 0)
		return -1;
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	memcpy(sa.sun_path, path, strlen(path) + 1);    /* the caller checked the length */
	struct timeval tv = { .tv_sec = 10 };   /* a stuck broker must not hang us (§6) */
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(MMB_CTL_FDS * sizeof(int))];
	} ctl;
	struct iovec iov = { .iov_base = rep, .iov_len = replen };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
			     .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf };
	ssize_t n = -1;
	if (setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0 ||
	    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0 ||
	    connect(s, (struct sockaddr *)&sa, sizeof sa) < 0)
		goto out;
	/* One send is one message on SOCK_SEQPACKET: it is sent whole or not at all. */
	if (send(s, req, len, MSG_NOSIGNAL) < 0)
		goto out;
	n = recvmsg(s, &mh, MSG_CMSG_CLOEXEC);
	if (n < 0 && errno == ECONNRESET) {
		/* The server closed with our request unread: a reply may still be queued (§6). */
		mh.msg_controllen = sizeof ctl.buf;
		n = recvmsg(s, &mh, MSG_CMSG_CLOEXEC);
	}
	if (n < 0)
		goto out;
	*msg_flags = mh.msg_flags;
	/* Collect every fd of every SCM_RIGHTS message, so that all can be closed (§4). */
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0))
			continue;
		size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < k; i++) {
			int fd;
			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
			if (*nfds < MMB_CTL_FDS) {
				fds[(*nfds)++] = fd;
			} else {
				close(fd);
				*bad = 1;
			}
		}
	}
out:
	{
		int e = errno;
		close(s);
		errno = e;
	}
	return n;
}

/* mmb_violation closes the received fds and reports a reply that breaks the protocol. */
static int mmb_violation(struct mmb_reply *r, const int *fds, int nfds, const char *what)
{
	for (int i = 0; i < nfds; i++)
		close(fds[i]);
	memset(r, 0, sizeof *r);
	snprintf(r->message, sizeof r->message, "%s", what);
	errno = EPROTO;
	return -1;
}

/* mmb_check_header returns what is wrong with the reply's header and lengths, or NULL. */
static const char *mmb_check_header(const uint8_t *rep, size_t n, int msg_flags)
{
	if (msg_flags & MSG_CTRUNC)
		return "more fds than a reply may carry (MSG_CTRUNC)";
	if (msg_flags & MSG_TRUNC || n > MMB_MAX_REPLY)
		return "reply larger than 1240 bytes (MSG_TRUNC)";
	if (n < MMB_REP_FIXED)
		return "reply shorter than 56 bytes";
	if (memcmp(rep, "MMBC", 4) != 0)
		return "bad magic";
	if (get16(rep + 4) != 1)
		return "reply version is not 1";
	if (get16(rep + 6) != 2)
		return "message type is not 2 (reply)";
	if (get32(rep + 8) != n)
		return "length field differs from the message size";
	if (memcmp(rep + 50, "\0\0\0\0\0\0", 6) != 0)
		return "reserved bytes are not zero";
	size_t rid = get16(rep + 44), rbdf = get16(rep + 46), rmsg = get16(rep + 48);
	if (rid > MMB_MAX_ID || rbdf > MMB_MAX_BDF || rmsg > MMB_MAX_MSG || MMB_REP_FIXED + rid + rbdf + rmsg != n)
		return "field lengths do not add up to the message size";
	if (!printable(rep + MMB_REP_FIXED, rid) || !printable(rep + MMB_REP_FIXED + rid, rbdf))
		return "lease id or bdf is not printable ASCII";
	if (!utf8(rep + MMB_REP_FIXED + rid + rbdf, rmsg))
		return "message is not UTF-8";
	return NULL;
}

/*
 * mmb_claim connects to the claim socket at path, claims lease_id with token and returns
 * the dma-buf fd (close-on-exec; the caller owns it), with *r describing it.
 *
 * It returns -1 otherwise, and then every fd the server sent has been closed:
 *  - refused: r->code is the reply's error code and r->message the server's message.
 *    A server that hung up without a reply counts as UNAVAILABLE (§6).
 *  - failed: r->code is MMB_OK and errno says why: EINVAL for a lease id, token or path
 *    the protocol or socket cannot carry, EPROTO for a reply that breaks the protocol
 *    (r->message says how), EAGAIN for the 10 s timeout, else the failed call's.
 */
int mmb_claim(const char *path, const char *lease_id, const char *token, struct mmb_reply *r)
{
	memset(r, 0, sizeof *r);
	size_t idlen = strlen(lease_id), toklen = strlen(token);
	if (idlen < 1 || idlen > MMB_MAX_ID || !printable((const uint8_t *)lease_id, idlen) ||
	    toklen < 1 || toklen > MMB_MAX_TOKEN || !printable((const uint8_t *)token, toklen) ||
	    strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
		errno = EINVAL;
		return -1;
	}

	/* Request (§3.2): header, flags, the two lengths, lease id, token. */
	uint8_t req[MMB_MAX_REQUEST];
	size_t len = MMB_REQ_FIXED + idlen + toklen;
	memcpy(req, "MMBC", 4);
	put16(req + 4, 1);              /* version */
	put16(req + 6, 1);              /* type: request */
	put32(req + 8, (uint32_t)len);  /* total length */
	put32(req + 12, 0);             /* flags */
	put16(req + 16, (uint16_t)idlen);
	put16(req + 18, (uint16_t)toklen);
	memcpy(req + MMB_REQ_FIXED, lease_id, idlen);
	memcpy(req + MMB_REQ_FIXED + idlen, token, toklen);

	/* Reply (§3.3, §4): room for the largest reply + 1, so that oversize shows. */
	uint8_t rep[MMB_MAX_REPLY + 1];
	int fds[MMB_CTL_FDS], nfds, toomany, msg_flags = 0;
	ssize_t n = mmb_exchange(path, req, len, rep, sizeof rep, &msg_flags, fds, &nfds, &toomany);
	if (n < 0)
		return -1;
	if (n == 0 && nfds == 0 && !toomany && !(msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
		/* End of file without a reply: the server gave up; claim again later (§6). */
		r->code = MMB_UNAVAILABLE;
		snprintf(r->message, sizeof r->message, "the server closed the connection without a reply");
		return -1;
	}
	const char *bad = toomany ? "more fds than a reply may carry" : mmb_check_header(rep, (size_t)n, msg_flags);
	if (bad)
		return mmb_violation(r, fds, nfds, bad);
	size_t rid = get16(rep + 44), rbdf = get16(rep + 46), rmsg = get16(rep + 48);
	r->code = get32(rep + 12);
	r->generation = get64(rep + 16);
	r->size = get64(rep + 24);
	r->inode = get64(rep + 32);
	r->bar = get32(rep + 40);
	memcpy(r->lease_id, rep + MMB_REP_FIXED, rid);
	memcpy(r->bdf, rep + MMB_REP_FIXED + rid, rbdf);
	memcpy(r->message, rep + MMB_REP_FIXED + rid + rbdf, rmsg);

	if (r->code != MMB_OK) {
		/* An error reply: no fd, no lease facts, our lease id or none (§3.3, §4). */
		if (nfds != 0)
			return mmb_violation(r, fds, nfds, "error reply carries an fd");
		if (r->generation || r->size || r->inode || r->bar || rbdf)
			return mmb_violation(r, fds, nfds, "error reply carries lease facts");
		if (rid && strcmp(r->lease_id, lease_id) != 0)
			return mmb_violation(r, fds, nfds, "error reply names another lease");
		return -1;
	}
	/* Success: exactly one fd, for our lease, with the announced inode (§3.3, §4). */
	struct stat st;
	if (nfds != 1)
		return mmb_violation(r, fds, nfds, "success reply without exactly one fd");
	if (strcmp(r->lease_id, lease_id) != 0)
		return mmb_violation(r, fds, nfds, "success reply names another lease");
	if (r->generation == 0 || r->bar > 5)
		return mmb_violation(r, fds, nfds, "success reply with generation 0 or a BAR above 5");
	if (fstat(fds[0], &st) < 0)
		return mmb_violation(r, fds, nfds, "fstat of the received fd failed");
	if ((uint64_t)st.st_ino != r->inode)
		return mmb_violation(r, fds, nfds, "the fd's inode differs from the reply's");
	return fds[0];
}

/* ---- The command: everything below only uses mmb_claim. ---- */

/* sanitize replaces what could garble a key=value line or a terminal with '?'. */
static void sanitize(char *s, int allow_space)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || *s == 0x7f || (*s == ' ' && !allow_space))
			*s = '?';
}

/* fdinfo copies the value of /proc/self/fdinfo/<fd>'s line "key:" into out ("-" if none). */
static void fdinfo(int fd, const char *key, char *out, size_t outlen)
{
	char path[64], buf[4096];
	snprintf(out, outlen, "-");
	snprintf(path, sizeof path, "/proc/self/fdinfo/%d", fd);
	int f = open(path, O_RDONLY | O_CLOEXEC);
	if (f < 0)
		return;
	ssize_t n = read(f, buf, sizeof buf - 1);
	close(f);
	if (n <= 0)
		return;
	buf[n] = '\0';
	size_t klen = strlen(key);
	for (char *line = buf; *line;) {
		char *end = strchr(line, '\n');
		if (strncmp(line, key, klen) == 0 && line[klen] == ':') {
			char *v = line + klen + 1;
			v += strspn(v, " \t");
			size_t vlen = strcspn(v, "\n");
			if (vlen > 0) {
				snprintf(out, outlen, "%.*s", (int)vlen, v);
				sanitize(out, 0);
			}
			return;
		}
		if (!end)
			return;
		line = end + 1;
	}
}

static int setenv_u64(const char *name, uint64_t v)
{
	char s[24];
	snprintf(s, sizeof s, "%" PRIu64, v);
	return setenv(name, s, 1);
}

/* run_with_fd makes fd the COMMAND's fd 3 and executes it. It returns only on failure. */
static void run_with_fd(int fd, const struct mmb_reply *r, char **command)
{
	if (fd != 3) {
		if (dup2(fd, 3) < 0)    /* the copy at 3 is not close-on-exec */
			goto fail;
		close(fd);
	} else if (fcntl(fd, F_SETFD, 0) < 0) {
		goto fail;
	}
	if (setenv("MMIO_LEASE_ID", r->lease_id, 1) < 0 || setenv("MMIO_LEASE_FD", "3", 1) < 0 ||
	    setenv("MMIO_LEASE_BDF", r->bdf, 1) < 0 || setenv_u64("MMIO_LEASE_BAR", r->bar) < 0 ||
	    setenv_u64("MMIO_LEASE_SIZE", r->size) < 0 || setenv_u64("MMIO_LEASE_INODE", r->inode) < 0 ||
	    setenv_u64("MMIO_LEASE_GENERATION", r->generation) < 0)
		goto fail;
	fflush(stdout);
	execvp(command[0], command);
fail:
	fprintf(stderr, "mmb-claim: run %s: %s\n", command[0], strerror(errno));
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: mmb-claim SOCKET LEASE_ID TOKEN [COMMAND [ARG]...]\n");
		return 2;
	}
	struct mmb_reply r;
	int fd = mmb_claim(argv[1], argv[2], argv[3], &r);
	if (fd < 0 && r.code != MMB_OK) {
		sanitize(r.message, 1);
		if (r.code < MMB_NCODES)
			fprintf(stderr, "mmb-claim: %s (%" PRIu32 "): %s\n", mmb_code_names[r.code], r.code, r.message);
		else
			fprintf(stderr, "mmb-claim: CODE_%" PRIu32 " (unknown to this client): %s\n", r.code, r.message);
		return r.code < MMB_NCODES ? 10 + (int)r.code : 30;
	}
	if (fd < 0 && errno == EPROTO) {
		fprintf(stderr, "mmb-claim: the server broke the claim protocol: %s\n", r.message);
		return 3;
	}
	if (fd < 0 && errno == EINVAL) {
		fprintf(stderr, "mmb-claim: the lease id (1-%d bytes) and token (1-%d bytes) must be "
			"printable ASCII without spaces, the socket path at most %zu bytes\n",
			MMB_MAX_ID, MMB_MAX_TOKEN, sizeof(((struct sockaddr_un *)0)->sun_path) - 1);
		return 2;
	}
	if (fd < 0) {
		fprintf(stderr, "mmb-claim: claim on %s: %s\n", argv[1],
			errno == EAGAIN ? "timed out (10 s)" : strerror(errno));
		return 1;
	}

	char size[32], exp_name[64], name[64];
	fdinfo(fd, "size", size, sizeof size);
	fdinfo(fd, "exp_name", exp_name, sizeof exp_name);
	fdinfo(fd, "name", name, sizeof name);
	int fdflags = fcntl(fd, F_GETFD);
	printf("lease_id=%s generation=%" PRIu64 " size=%" PRIu64 " inode=%" PRIu64 " bdf=%s bar=%" PRIu32
	       " fd=%d cloexec=%d fdinfo_size=%s exp_name=%s name=%s\n",
	       r.lease_id, r.generation, r.size, r.inode, r.bdf[0] ? r.bdf : "-", r.bar,
	       fd, fdflags >= 0 && (fdflags & FD_CLOEXEC), size, exp_name, name);
	if (argc > 4) {
		run_with_fd(fd, &r, argv + 4);
		return 127;
	}
	close(fd);
	return fflush(stdout) == 0 ? 0 : 1;
}
