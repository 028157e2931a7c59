/* A TLS client and server in one executable with OpenSSL linked in statically (libssl.a,
 * libcrypto.a from Debian's libssl-dev), for tests/live/test_tls_static_live.py: the SSL
 * functions are the executable's own symbols, not a libssl.so's.
 *
 *     static_tls CERT KEY    wait for a line on stdin, then: the server (a child process)
 *                            answers "pong <request>" to one request of the client, which
 *                            prints "<reply> <client port> <server port>"
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3)
        return 2;
    char line[16];
    if (!fgets(line, sizeof(line), stdin))
        return 2;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t length = sizeof(address);
    if (bind(listener, (struct sockaddr *)&address, sizeof(address)) || listen(listener, 1) ||
        getsockname(listener, (struct sockaddr *)&address, &length))
        return 1;
    pid_t child = fork();
    if (child == 0) {
        SSL_CTX *context = SSL_CTX_new(TLS_server_method());
        if (SSL_CTX_use_certificate_file(context, argv[1], SSL_FILETYPE_PEM) != 1 ||
            SSL_CTX_use_PrivateKey_file(context, argv[2], SSL_FILETYPE_PEM) != 1)
            return 1;
        int connection = accept(listener, NULL, NULL);
        SSL *ssl = SSL_new(context);
        SSL_set_fd(ssl, connection);
        char request[256] = "pong ";
        if (SSL_accept(ssl) != 1)
            return 1;
        int got = SSL_read(ssl, request + 5, sizeof(request) - 6);
        if (got <= 0)
            return 1;
        SSL_write(ssl, request, 5 + got);
        SSL_shutdown(ssl);
        close(connection);
        return 0;
    }
    close(listener);
    SSL_CTX *context = SSL_CTX_new(TLS_client_method());
    int connection = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(connection, (struct sockaddr *)&address, sizeof(address)))
        return 1;
    struct sockaddr_in local;
    length = sizeof(local);
    getsockname(connection, (struct sockaddr *)&local, &length);
    SSL *ssl = SSL_new(context);
    SSL_set_fd(ssl, connection);
    if (SSL_connect(ssl) != 1) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    const char *request = "ping from a static build";
    SSL_write(ssl, request, strlen(request));
    char reply[256] = {0};
    int got = SSL_read(ssl, reply, sizeof(reply) - 1);
    int status = 0;
    waitpid(child, &status, 0);
    if (got <= 0 || status != 0)
        return 1;
    printf("%s %d %d\n", reply, ntohs(local.sin_port), ntohs(address.sin_port));
    return 0;
}
