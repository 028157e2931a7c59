/*
 * The compiled lane's Kafka part, included by _express.c (after its HTTP/1, HTTP/2 and Redis
 * parts). Being written: not included yet.
 */
