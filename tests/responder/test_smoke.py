import dns.message
import dns.query
import dns.rcode
import dns.update


def test_register_and_resolve(responder):
    update = dns.update.UpdateMessage(responder.zone, keyring=responder.key)
    update.add("_web._tcp", 5, "SRV", "0 5 8080 host-a")
    update.add("host-a", 5, "A", "127.0.0.5")
    reply = dns.query.tcp(update, responder.host, port=responder.port, timeout=5)
    assert reply.rcode() == dns.rcode.NOERROR
    query = dns.message.make_query("_web._tcp." + responder.zone, "SRV")
    answer = dns.query.udp(query, responder.host, port=responder.port, timeout=5)
    assert answer.answer[0][0].port == 8080
    assert answer.additional[0][0].address == "127.0.0.5"
