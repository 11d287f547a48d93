/*
 * dockyard's per-command reaper inside a sandbox (see reaper.py for the kill side).
 *
 *   reaper STATUS_FD UID GID PROGRAM [ARG...]
 *
 * The supervisor starts it (as root, in the command's working directory, with the command's
 * environment and its output pipes) for every command. It marks itself a child subreaper,
 * forks the command and stays behind as its reaper: every process the command starts, however
 * it detaches (a double fork, `setsid`, `nohup ... &`, an emptied environment), is re-parented
 * to the reaper when its parent ends, so it stays below the reaper for as long as the reaper
 * lives. Running as root, the reaper can be neither signalled nor traced by the command's user.
 *
 * The command's process takes a session of its own, raises its OOM score to the maximum (the
 * kernel kills it, or anything it starts, long before the supervisor), lowers its CPU priority
 * (within the sandbox's CPU quota the supervisor comes first), drops every supplementary group
 * and becomes UID:GID, then executes PROGRAM (searched in the PATH of its environment).
 *
 * STATUS_FD tells the supervisor whether the command started: it reaches end of file once the
 * program has been executed, or first carries the errno (decimal digits) of the step that
 * failed (then the reaper ends with 127 for a program not found, 126 otherwise).
 *
 * The reaper ends as soon as the command's own process does, with the same exit status (128 +
 * the signal for one killed by a signal): what the command left running in the background goes
 * on running, under init, as a server started with `nohup` should.
 *
 * A compiled program rather than Python in the supervisor's forked child: the supervisor can
 * then start it with vfork, and a command starts about as fast as one with no reaper at all.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define COMMAND_OOM_SCORE "1000" /* the kernel's first choice when the sandbox runs out of memory */
#define COMMAND_NICE 10

static void report(int fd, int err)
{
    char digits[16];
    int length = snprintf(digits, sizeof digits, "%d", err ? err : EIO);
    if (write(fd, digits, (size_t)length) < 0) {
        /* the supervisor has gone: nobody is left to tell */
    }
}

static int number(const char *text, long *out)
{
    char *end;
    errno = 0;
    *out = strtol(text, &end, 10);
    return errno == 0 && end != text && *end == '\0' && *out >= 0;
}

/* In the command's process: a session, the limits, the user, then the program. Never returns. */
static void become_command(int told, uid_t uid, gid_t gid, char **argv)
{
    int err = 0;
    if (setsid() < 0)
        err = errno;
    if (!err) {
        int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        if (fd >= 0) { /* lower than the container allows: keep what it gives */
            if (write(fd, COMMAND_OOM_SCORE, strlen(COMMAND_OOM_SCORE)) < 0) {
            }
            close(fd);
        }
        errno = 0;
        if (nice(COMMAND_NICE) == -1 && errno)
            err = errno;
    }
    if (!err && setgroups(0, NULL) != 0)
        err = errno;
    if (!err && setresgid(gid, gid, gid) != 0)
        err = errno;
    if (!err && setresuid(uid, uid, uid) != 0)
        err = errno;
    if (!err) {
        execvp(argv[0], argv);
        err = errno;
    }
    report(told, err);
    _exit(err == ENOENT ? 127 : 126);
}

int main(int argc, char **argv)
{
    long status_fd, uid, gid;
    if (argc < 5 || !number(argv[1], &status_fd) || !number(argv[2], &uid) || !number(argv[3], &gid)) {
        fprintf(stderr, "usage: reaper STATUS_FD UID GID PROGRAM [ARG...]\n");
        return 126;
    }
    int status = (int)status_fd;
    /* The command inherits a clean signal state, whatever the supervisor had. */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            signal(sig, SIG_DFL);
    /* gVisor refuses it below its own init (EINVAL): the reaper still kills its lineage. */
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 && errno != EINVAL) {
        report(status, errno);
        return 126;
    }
    int told[2];
    if (pipe2(told, O_CLOEXEC) != 0) {
        report(status, errno);
        return 126;
    }
    pid_t command = fork();
    if (command < 0) {
        report(status, errno);
        return 126;
    }
    if (command == 0) {
        close(told[0]);
        close(status);
        become_command(told[1], (uid_t)uid, (gid_t)gid, argv + 4);
    }
    close(told[1]);
    /* End of file once the program runs (the pipe is close-on-exec); digits if a step failed. */
    char failed[16];
    ssize_t got = 0, n;
    while (got < (ssize_t)sizeof failed && (n = read(told[0], failed + got, sizeof failed - (size_t)got)) != 0) {
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        got += n;
    }
    close(told[0]);
    if (got > 0 && write(status, failed, (size_t)got) < 0) {
    }
    close(status);
    /* The command's pipes are its own: the reaper holds none, so they close when it is done. */
    close(0);
    close(1);
    close(2);
    int code = 255, how;
    for (;;) {
        pid_t ended = waitpid(-1, &how, 0);
        if (ended < 0) {
            if (errno == EINTR)
                continue;
            break; /* ECHILD: nothing left */
        }
        if (ended == command) {
            code = WIFEXITED(how) ? WEXITSTATUS(how) : 128 + WTERMSIG(how);
            break;
        }
    }
    return code;
}
